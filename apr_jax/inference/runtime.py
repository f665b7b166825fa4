"""SoS+ and APR orchestration over a batched generator (greedy here).

SoS+: one serial thread per problem. APR: the parent decodes until EOS; if its text ends with a spawn
block, every child prompt is built by :mod:`apr_jax.countdown.traces`, all children of all problems decode
together as one batch, their returns are joined into the parent's continuation, and the parent decodes
again; repeated while parents keep spawning. Every format decision is in ``traces``; this module only
schedules. Malformed output never raises: each problem records why it stopped.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from apr_jax.countdown import game, traces

# generate(prompts as token-id lists, max_new_tokens) -> continuations (ending with EOS when written)
GenerateFn = Callable[[Sequence[Sequence[int]], int], list[list[int]]]


@dataclasses.dataclass
class Thread:
    prompt: str
    output: str = ""
    tokens: int = 0  # generated tokens
    stop: str = ""  # "eos" | "length"


@dataclasses.dataclass
class ProblemResult:
    nums: list[int]
    target: int
    mode: str
    answer: str | None = None  # the final solution path
    correct: bool = False
    reason: str = ""
    threads: list[dict] = dataclasses.field(default_factory=list)  # {"role", "prompt", "output", "tokens", "stop"}
    total_tokens: int = 0
    sequential_tokens: int = 0
    children: int = 0


class Codec:
    """Text <-> token ids for prompts (BOS added) and continuations (specials dropped)."""

    def __init__(self, tokenizer, bos_id: int, eos_id: int):
        self.tok, self.bos_id, self.eos_id = tokenizer, bos_id, eos_id

    def prompt_ids(self, text: str) -> list[int]:
        return [self.bos_id] + self.tok.encode(text, add_special_tokens=False).ids

    def text(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def _run(generate: GenerateFn, codec: Codec, prompts: list[str], context: int) -> list[Thread]:
    """Decode every prompt once (one batch); a call may use the context left after its prompt."""
    ids = [codec.prompt_ids(p) for p in prompts]
    out: list[Thread] = [Thread(p) for p in prompts]
    todo = [i for i, x in enumerate(ids) if len(x) < context]
    for i in set(range(len(prompts))) - set(todo):
        out[i].stop = "prompt_too_long"
    if todo:
        budget = context - min(len(ids[i]) for i in todo)
        gens = generate([ids[i] for i in todo], budget)
        for i, gen in zip(todo, gens):
            room = context - len(ids[i])
            gen = gen[:room]
            ended = bool(gen) and gen[-1] == codec.eos_id
            out[i].output, out[i].tokens = codec.text(gen), len(gen)
            out[i].stop = "eos" if ended else "length"
    return out


def _finish(result: ProblemResult, final_text: str) -> ProblemResult:
    path = traces.solution_path(final_text)
    result.answer = path
    if path is None:
        result.reason = result.reason or "no solution path in the final text"
        return result
    verdict = game.verify_path(result.nums, result.target, path)
    result.correct, result.reason = verdict.ok, verdict.reason
    return result


def solve_sosp(generate: GenerateFn, codec: Codec, problems: Sequence[dict], context: int) -> list[ProblemResult]:
    prompts = [traces.sosp_prompt(p["nums"], p["target"]) for p in problems]
    results = []
    for p, th in zip(problems, _run(generate, codec, prompts, context)):
        r = ProblemResult(p["nums"], p["target"], "sosp", total_tokens=th.tokens, sequential_tokens=th.tokens)
        r.threads.append({"role": "main", **dataclasses.asdict(th)})
        if th.stop != "eos":
            r.reason = f"thread stopped: {th.stop}"
        results.append(_finish(r, th.prompt + th.output))
    return results


def solve_apr(generate: GenerateFn, codec: Codec, problems: Sequence[dict], context: int, max_spawns: int = 4,
              max_children: int = 16) -> list[ProblemResult]:
    """APR with one level of children; children of all problems decode as one batch per round."""
    results = [ProblemResult(p["nums"], p["target"], "apr") for p in problems]
    prompts = {i: traces.apr_prompt(p["nums"], p["target"]) for i, p in enumerate(problems)}
    final: dict[int, str] = {}
    for round_ in range(max_spawns + 1):
        if not prompts:
            break
        order = sorted(prompts)
        parents = _run(generate, codec, [prompts[i] for i in order], context)
        spawning: dict[int, tuple[str, list]] = {}
        for i, th in zip(order, parents):
            r = results[i]
            r.threads.append({"role": "parent", **dataclasses.asdict(th)})
            r.total_tokens += th.tokens
            r.sequential_tokens += th.tokens
            text = th.prompt + th.output
            if th.stop == "eos" and traces.ends_with_spawn(text) and round_ < max_spawns:
                try:
                    kids = traces.child_prompts(text)
                except traces.TraceFormatError as err:
                    r.reason = f"malformed spawn: {err}"
                    final[i] = text
                    continue
                if len(kids) > max_children:
                    r.reason = f"spawned {len(kids)} children, more than the limit {max_children}"
                    final[i] = text
                    continue
                spawning[i] = (text, kids)
            else:
                if th.stop != "eos":
                    r.reason = f"parent stopped: {th.stop}"
                elif traces.ends_with_spawn(text):
                    r.reason = f"spawn limit {max_spawns} reached"
                final[i] = text
        flat = [(i, prompt) for i, (_, kids) in spawning.items() for _, prompt in kids]
        children = _run(generate, codec, [p for _, p in flat], context) if flat else []
        by_problem: dict[int, list[Thread]] = {}
        for (i, _), th in zip(flat, children):
            by_problem.setdefault(i, []).append(th)
        prompts = {}
        for i, (text, _) in spawning.items():
            r, kids = results[i], by_problem[i]
            r.children += len(kids)
            r.threads += [{"role": "child", **dataclasses.asdict(th)} for th in kids]
            r.total_tokens += sum(th.tokens for th in kids)
            r.sequential_tokens += max(th.tokens for th in kids)
            returns = [traces.child_return(th.prompt + th.output) if th.stop == "eos" else None for th in kids]
            prompts[i] = traces.parent_continuation(text, returns)
    for i, text in final.items():
        _finish(results[i], text)
    return results


def accuracy(results: Sequence[ProblemResult]) -> float:
    return sum(r.correct for r in results) / max(1, len(results))

