"""SoS+, self-consistency and APR thread trees scheduled on the slot engine.

Every problem is a small state machine driven by the engine's *finished thread* events:

- ``sosp``: one serial thread (path ``p0``); its text's solution path is the answer.
- ``sc``: ``samples`` independent SoS+ threads (paths ``s0 .. s{N-1}``); pass@N (some sample verifies) and
  cons@N (the most frequent answer, by its sequence of operations, verifies) are both reported.
- ``apr``: the parent call ``p0`` decodes until EOS. If its text ends with a spawn block, the children are
  built by :mod:`apr_jax.countdown.traces` (paths ``p0.c0, p0.c1, ...``) and queued ahead of new problems;
  they decode in free slots beside every other thread. When the last child stops, the join block is built
  and the parent continues as call ``p1`` *in its own slot*: the engine rolls its KV cache back to the
  pre-spawn prefix and extends it with the join block only. One level of children (a child's spawn block is
  not run: it returns no solution). If no slot is free when a parent spawns, the parent gives its slot up
  (so its children can never be starved) and its continuation is prefilled afresh later.

Budgets (:class:`Budgets`) are enforced here and in the engine, each with a recorded outcome: children past
``max_children`` are not run and join as "No Solution" (thread stop ``not_run``); a spawn past
``max_spawns`` ends the problem; a thread stops at the context (``thread_limit``); the problem's total tokens
(prompts + outputs, shared prefixes once) stop at ``max_total_tokens`` (``problem_budget``). Malformed output
(an unclosed or unparsable spawn block, a join marker written by the model, garbage) never raises: the
problem ends with a reason and the rest of the batch goes on. So does a thread a remote backend could not
decode (``stop == "error"``): its problem ends with the backend's reason, its other threads are abandoned.

Token accounting per thread (:func:`charged_tokens`): ``prompt tokens - shared_prompt_tokens + generated
tokens``, where ``shared_prompt_tokens`` is the prefix a parent's continuation shares with its previous call
(prompt and output), counted once. The charge depends on the thread tree only, not on whether the engine
still held the parent's cache (``new_prompt_tokens``, what was actually prefilled, varies with the number of
slots). total = sum over threads; sequential = parent calls + the longest child of each spawn (the critical
path).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np

from apr_jax.countdown import game, traces
from apr_jax.inference.engine import Finished, common_prefix
from apr_jax.inference.sampling import thread_key

MODES = ("apr", "sosp", "sc")
_CHILD_PRIORITY, _ROOT_PRIORITY = 0, 1


class Codec:
    """Text <-> token ids for prompts (BOS added) and continuations (specials dropped)."""

    def __init__(self, tokenizer, bos_id: int, eos_id: int):
        self.tok, self.bos_id, self.eos_id = tokenizer, bos_id, eos_id

    def prompt_ids(self, text: str) -> list[int]:
        return [self.bos_id] + self.tok.encode(text, add_special_tokens=False).ids

    def text(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def ids(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids


class EngineLike(Protocol):
    """What the runtime needs of :class:`apr_jax.inference.engine.Engine` (tests substitute a script)."""

    context: int
    steps: int

    def submit(self, key, prompt: Sequence[int], max_new: int, rng: np.ndarray, priority: int = 1) -> None: ...
    def continue_thread(self, key, prompt: Sequence[int], max_new: int, rng: np.ndarray, new_key=None) -> None: ...
    def release(self, key) -> None: ...
    def step(self) -> list[Finished]: ...
    @property
    def free_slots(self) -> int: ...
    @property
    def queued(self) -> int: ...
    @property
    def idle(self) -> bool: ...


@dataclasses.dataclass(frozen=True)
class Budgets:
    """Limits the runtime enforces (None = unlimited; the context always applies)."""

    max_children: int = 16
    max_spawns: int = 8
    max_total_tokens: int | None = None


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One evaluation's settings.

    Attributes:
      mode: ``apr``, ``sosp`` or ``sc``.
      samples: samples per problem in ``sc`` mode.
      seed: root of every thread's PRNG key (with the problem id and thread path).
      sub_call_budget: APR conditioning prefix ``Sub Call Budget: n`` (None: no prefix).
      token_budget: SoS+/SC conditioning prefix ``Token Budget: b`` (None: no prefix).
      budgets: enforced limits.
    """

    mode: str = "apr"
    samples: int = 1
    seed: int = 0
    sub_call_budget: int | None = None
    token_budget: int | None = None
    budgets: Budgets = Budgets()

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")


@dataclasses.dataclass
class _Problem:
    index: int
    pid: object
    nums: list[int]
    target: int
    threads: list[dict] = dataclasses.field(default_factory=list)
    by_path: dict[str, dict] = dataclasses.field(default_factory=dict)
    charged: int = 0
    spawns: int = 0
    children: int = 0
    waiting: dict = dataclasses.field(default_factory=dict)  # spawn path -> pending child paths
    returns: dict = dataclasses.field(default_factory=dict)  # spawn path -> {child index: return}
    holds_slot: dict = dataclasses.field(default_factory=dict)  # parent path -> bool
    open_threads: int = 0
    final_text: str | None = None
    reason: str = ""
    done: bool = False


class Runtime:
    """Schedules the thread trees of many problems on one engine (see the module docstring)."""

    def __init__(self, engine: EngineLike, codec: Codec, run: RunConfig):
        self.engine, self.codec, self.run = engine, codec, run
        self.context = engine.context
        budgets = run.budgets
        if budgets.max_children < 1 or budgets.max_spawns < 0:
            raise ValueError(f"invalid budgets {budgets}")

    # ------------------------------------------------------------------------------------ threads

    def _thread(self, prob: _Problem, path: str, role: str, parent: str | None, call: int, prompt: str) -> dict:
        rec = {"id": len(prob.threads), "path": path, "role": role, "parent": None, "parent_path": parent,
               "call": call, "prompt": prompt, "output": "", "prompt_tokens": 0, "new_prompt_tokens": 0,
               "shared_prompt_tokens": 0, "tokens": 0, "stop": "", "slot": None, "start_step": None,
               "end_step": None, "start_s": None, "end_s": None, "on_answer_path": False}
        if parent is not None:
            rec["parent"] = prob.by_path[parent]["id"]
        prob.threads.append(rec)
        prob.by_path[path] = rec
        return rec

    def _budget_left(self, prob: _Problem) -> int | None:
        total = self.run.budgets.max_total_tokens
        return None if total is None else total - prob.charged

    def _launch(self, prob: _Problem, recs: list[dict], priority: int, continue_from: str | None = None,
                shared_with: dict | None = None) -> None:
        """Queue threads (all children of one spawn, or one parent call / sample), sharing the budget left.

        ``shared_with``: the previous call of a parent continuation (its shared prefix is not charged again);
        ``continue_from``: its path when the engine still holds its slot (the prefix is then not recomputed).
        """
        left = self._budget_left(prob)
        for rec in recs:
            ids = self.codec.prompt_ids(rec["prompt"])
            rec["prompt_tokens"], rec["prompt_ids"] = len(ids), ids
            if shared_with is not None:
                rec["shared_prompt_tokens"] = common_prefix(shared_with["prompt_ids"] + shared_with["token_ids"], ids)
            room = self.context - len(ids)
            share = None if left is None else (left - len(ids) + rec["shared_prompt_tokens"]) // len(recs)
            if room < 1:
                rec["stop"] = "thread_limit"
                continue
            if share is not None and share < 1:
                rec["stop"] = "problem_budget"
                continue
            max_new = room if share is None else min(room, share)
            rec["_max_new_is_budget"] = share is not None and share < room
            key = (prob.index, rec["path"])
            rng = thread_key(self.run.seed, prob.pid, rec["path"])
            if continue_from is not None:
                self.engine.continue_thread((prob.index, continue_from), ids, max_new, rng, new_key=key)
            else:
                self.engine.submit(key, ids, max_new, rng, priority)
            prob.open_threads += 1

    # ------------------------------------------------------------------------------------ problems

    def _start(self, prob: _Problem) -> None:
        run = self.run
        if run.mode == "apr":
            prefix = "" if run.sub_call_budget is None else traces.sub_call_budget_prefix(run.sub_call_budget)
            rec = self._thread(prob, "p0", "parent", None, 0, prefix + traces.apr_prompt(prob.nums, prob.target))
            recs = [rec]
        else:
            prefix = "" if run.token_budget is None else traces.token_budget_prefix(run.token_budget)
            prompt = prefix + traces.sosp_prompt(prob.nums, prob.target)
            if run.mode == "sosp":
                recs = [self._thread(prob, "p0", "parent", None, 0, prompt)]
            else:
                recs = [self._thread(prob, f"s{i}", "sample", None, 0, prompt) for i in range(run.samples)]
        self._launch(prob, recs, _ROOT_PRIORITY)
        if prob.open_threads == 0:
            self._end(prob, recs[0]["prompt"], f"no thread could start: {recs[0]['stop']}")

    def _end(self, prob: _Problem, final_text: str | None, reason: str = "") -> None:
        prob.final_text, prob.reason, prob.done = final_text, prob.reason or reason, True

    def _on_finished(self, prob: _Problem, f: Finished) -> None:
        rec = prob.by_path[f.key[1]]
        prob.open_threads -= 1
        rec.update(output=self.codec.text(f.tokens), tokens=len(f.tokens), slot=f.slot, start_step=f.start_step,
                   end_step=f.end_step, start_s=f.start_s, end_s=f.end_s, new_prompt_tokens=f.new_prompt_tokens)
        rec["token_ids"], rec["logprobs"] = f.tokens, f.logprobs
        if f.forced:
            rec["forced"], rec["forced_tokens"] = f.forced, len(f.forced)
        prob.charged += charged_tokens(rec)
        if f.stop == "error" or prob.done:  # a backend failure, or a thread of a problem that already ended
            self.engine.release(f.key)
            rec.pop("_max_new_is_budget", None)
            rec["stop"] = "error" if f.stop == "error" else "abandoned"
            if f.error:
                rec["error"] = f.error
            if not prob.done:
                self._end(prob, None, f"backend error: {f.error}")
            return
        if f.stop == "length":
            rec["stop"] = "problem_budget" if rec.pop("_max_new_is_budget", False) else "thread_limit"
        elif f.stop == "stop_sequence":
            rec["stop"] = "join_marker"
        else:
            rec["stop"] = "eos"
        rec.pop("_max_new_is_budget", None)
        text = rec["prompt"] + rec["output"]
        if rec["role"] == "child":
            self.engine.release(f.key)
            if rec["stop"] == "eos" and traces.ends_with_spawn(text):
                rec["stop"] = "child_spawn"  # one level of children: not run, returns no solution
            self._child_done(prob, rec)
        elif rec["role"] == "sample":
            self.engine.release(f.key)
            if prob.open_threads == 0:
                self._end(prob, None)
        else:
            self._parent_done(prob, rec, f, text)

    def _parent_done(self, prob: _Problem, rec: dict, f: Finished, text: str) -> None:
        if self.run.mode != "apr" or rec["stop"] != "eos" or not traces.ends_with_spawn(text):
            self.engine.release(f.key)
            reasons = {"thread_limit": "the parent reached its context limit",
                       "problem_budget": "the problem's token budget ran out",
                       "join_marker": "the model wrote a join marker ('<Sub Searches>') itself"}
            reason = reasons.get(rec["stop"], "")
            if not reason and traces.SPAWN_OPEN in rec["output"] and traces.SPAWN_CLOSE not in rec["output"]:
                rec["stop"], reason = "spawn_unclosed", "the spawn block was never closed"
            self._end(prob, text, reason)
            return
        rec["stop"] = "spawn"
        if prob.spawns >= self.run.budgets.max_spawns:
            self.engine.release(f.key)
            self._end(prob, text, f"spawn limit {self.run.budgets.max_spawns} reached")
            return
        try:
            kids = traces.child_prompts(text)
        except traces.TraceFormatError as err:
            self.engine.release(f.key)
            self._end(prob, text, f"malformed spawn block: {err}")
            return
        prob.spawns += 1
        # The parent keeps its slot (and cache) only if a child can still get a slot beside it.
        prob.holds_slot[rec["path"]] = self.engine.free_slots > 0
        if not prob.holds_slot[rec["path"]]:
            self.engine.release(f.key)
        limit = self.run.budgets.max_children
        recs, returns = [], {}
        for item, prompt in kids:
            child = self._thread(prob, f"{rec['path']}.c{item.index}", "child", rec["path"], rec["call"], prompt)
            if item.index >= limit:
                child["stop"] = "not_run"
                returns[item.index] = None
            else:
                recs.append(child)
        prob.children += len(recs)
        prob.returns[rec["path"]] = returns
        prob.waiting[rec["path"]] = {c["path"] for c in recs}
        self._launch(prob, recs, _CHILD_PRIORITY)
        for child in recs:
            if child["stop"]:  # could not start (no room or no budget): returns no solution
                self._child_done(prob, child)

    def _child_done(self, prob: _Problem, child: dict) -> None:
        parent_path = child["parent_path"]
        ok = child["stop"] == "eos"
        index = int(child["path"].rsplit(".c", 1)[1])
        prob.returns[parent_path][index] = traces.child_return(child["prompt"] + child["output"]) if ok else None
        prob.waiting[parent_path].discard(child["path"])
        if prob.waiting[parent_path]:
            return
        parent = prob.by_path[parent_path]
        spawn_text = parent["prompt"] + parent["output"]
        n_items = len(traces.parse_spawn(spawn_text))
        returns = [prob.returns[parent_path].get(i) for i in range(n_items)]
        continuation = traces.parent_continuation(spawn_text, returns)
        nxt = self._thread(prob, f"p{parent['call'] + 1}", "parent", None, parent["call"] + 1, continuation)
        held = prob.holds_slot.pop(parent_path)
        self._launch(prob, [nxt], _CHILD_PRIORITY, continue_from=parent_path if held else None, shared_with=parent)
        if nxt["stop"]:  # the continuation does not fit (context or budget)
            if held:
                self.engine.release((prob.index, parent_path))
            reason = ("the parent's continuation does not fit its context" if nxt["stop"] == "thread_limit"
                      else "the problem's token budget ran out")
            self._end(prob, continuation, reason)

    # ------------------------------------------------------------------------------------ results

    def _result(self, prob: _Problem) -> dict:
        threads = prob.threads
        for t in threads:
            t.pop("parent_path", None)
            t.pop("_max_new_is_budget", None)
        charged = {t["path"]: charged_tokens(t) for t in threads}
        sequential = sum(charged[t["path"]] for t in threads if t["role"] == "parent")
        by_spawn = collections.defaultdict(list)
        for t in threads:
            if t["role"] == "child":
                by_spawn[t["parent"]].append(charged[t["path"]])
        sequential += sum(max(v) for v in by_spawn.values())
        starts = [t["start_s"] for t in threads if t["start_s"] is not None]
        ends = [t["end_s"] for t in threads if t["end_s"] is not None]
        out = {"problem": {"id": prob.pid, "nums": prob.nums, "target": prob.target}, "mode": self.run.mode,
               "answer": None, "correct": False, "reason": prob.reason, "total_tokens": sum(charged.values()),
               "sequential_tokens": sequential if self.run.mode != "sc" else max(charged.values(), default=0),
               "children": prob.children, "spawns": prob.spawns,
               "wall_s": round(max(ends) - min(starts), 4) if starts and ends else 0.0, "threads": threads}
        if self.run.mode == "sc":
            self._vote(prob, out)
        else:
            self._verify(prob, out)
        return out

    def _verify(self, prob: _Problem, out: dict) -> None:
        text = prob.final_text or ""
        path = traces.solution_path(text)
        out["answer"] = path
        if path is None:
            out["reason"] = prob.reason or "no solution path in the final output"
            return
        verdict = game.verify_path(prob.nums, prob.target, path)
        out["correct"] = verdict.ok
        out["reason"] = verdict.reason if verdict.ok or not prob.reason else f"{prob.reason}; {verdict.reason}"
        ops = traces.path_operations(path)
        for t in prob.threads:
            if t["role"] == "parent":
                t["on_answer_path"] = True
            elif t["role"] == "child" and t["stop"] == "eos":
                ret = traces.path_operations(traces.child_return(t["prompt"] + t["output"]))
                t["on_answer_path"] = bool(ret) and ops[-len(ret):] == ret

    def _vote(self, prob: _Problem, out: dict) -> None:
        samples = []
        for t in prob.threads:
            path = traces.solution_path(t["prompt"] + t["output"])
            ok = path is not None and game.verify_path(prob.nums, prob.target, path).ok
            samples.append({"path": t["path"], "answer": path, "correct": ok})
        out["samples"] = [{"answer": s["answer"], "correct": s["correct"]} for s in samples]
        out["pass"] = any(s["correct"] for s in samples)
        if all(s["answer"] is None for s in samples):
            out["reason"] = "no sample wrote a solution path"
            return
        win = majority_vote([s["answer"] for s in samples])
        winner = samples[win]
        out["answer"], out["correct"] = winner["answer"], winner["correct"]
        out["reason"] = "ok" if winner["correct"] else "the majority answer does not verify"
        winner_ops = traces.path_operations(winner["answer"])
        for s, t in zip(samples, prob.threads):
            o = traces.path_operations(s["answer"])
            t["on_answer_path"] = s["answer"] is not None and o == winner_ops

    # ------------------------------------------------------------------------------------ driver

    def solve(self, problems: Sequence[dict], on_result: Callable[[dict], None] | None = None) -> list[dict]:
        """Run every problem (dicts with ``nums``, ``target`` and optionally ``id``); results in input order.

        ``on_result`` is called with each result as its problem finishes (progress bars, streaming writes).
        """
        probs = [_Problem(i, p.get("id", i), list(p["nums"]), int(p["target"])) for i, p in enumerate(problems)]
        results: list[dict | None] = [None] * len(probs)
        pending = collections.deque(probs)
        active: dict[int, _Problem] = {}

        def collect(prob: _Problem) -> None:
            results[prob.index] = self._result(prob)
            active.pop(prob.index, None)
            if on_result is not None:
                on_result(results[prob.index])

        while pending or active:
            while pending and self.engine.free_slots > self.engine.queued:
                prob = pending.popleft()
                active[prob.index] = prob
                self._start(prob)
                if prob.done and prob.open_threads == 0:
                    collect(prob)
            if not active:
                continue
            finished = self.engine.step()
            if not finished and self.engine.idle:
                raise RuntimeError("engine idle while problems are unfinished (a scheduling bug)")
            for f in finished:
                prob = active[f.key[0]]
                self._on_finished(prob, f)
                if prob.done and prob.open_threads == 0:
                    collect(prob)
        return results


def charged_tokens(thread: dict) -> int:
    """Tokens a thread record is charged: its prompt less the prefix shared with the previous call, plus
    its output (records written before ``shared_prompt_tokens`` existed: the prefilled prompt tokens)."""
    shared = thread.get("shared_prompt_tokens", thread["prompt_tokens"] - thread["new_prompt_tokens"])
    return thread["prompt_tokens"] - shared + thread["tokens"]


def majority_vote(answers: Sequence[str | None]) -> int | None:
    """Index of the self-consistency winner: the most frequent answer by its sequence of operations (ties:
    the earliest sample); None when no sample answered. pass@n/cons@n reports vote with this function too."""
    ops = [None if a is None else traces.path_operations(a) for a in answers]
    counts = collections.Counter(o for o in ops if o is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(i for i, o in enumerate(ops) if o is not None and counts[o] == best)


def verified_child_paths(result: dict) -> list[tuple[str, ...]]:
    """The verified paths the children of an APR result returned, each as the operations from the problem's
    numbers to the target (the operations in the child's prompt, then those of its returned path): a child
    counts when its state follows from the problem's numbers by its prompt's operations and its returned path
    reaches the target from there."""
    nums, target = result["problem"]["nums"], result["problem"]["target"]
    paths = []
    for t in result["threads"]:
        if t["role"] != "child" or t["stop"] != "eos":
            continue
        path = traces.child_return(t["prompt"] + t["output"])
        state = next((line for line in t["prompt"].split("\n") if line.startswith(traces.CURRENT_STATE)), None)
        if not path or state is None:
            continue
        try:
            _, child_nums, ops = traces.parse_line(state).fields
        except traces.TraceFormatError:
            continue
        if game.replay_operations(nums, ops) == sorted(child_nums) and game.verify_path(child_nums, target, path):
            paths.append(tuple(ops) + traces.path_operations(path))
    return paths


def child_solved(result: dict) -> bool:
    """True when some child of an APR result returned a verified path (:func:`verified_child_paths`). A
    diagnostic of the parallel search alone; the problem counts as solved only if the parent's answer verifies."""
    return bool(verified_child_paths(result))


def departure(result: dict) -> str | None:
    """Where the parent of an APR result went wrong when a child returned a verified path and the parent's
    answer does not verify; ``None`` for any other result. The parent's written path is the one that follows
    the first ``Goal Reached`` line of its last call's output (the demonstrations copy the winning child's path
    from the root there). ``"no path"``: it wrote no operation there; ``"operation k"``: its k-th operation
    is the first that departs from every verified child path (1: the operation into the child's node, which
    the parent must retrieve from its spawn or join; later: copying the child's path; a path that stops short of
    every verified path it agrees with departs at its first missing operation); ``"operations right"``: the
    operations are a verified child's but a line of the path is not (a state or a resulting list)."""
    if result.get("correct") or not result.get("threads"):
        return None
    verified = verified_child_paths(result)
    if not verified:
        return None
    parents = [t for t in result["threads"] if t["role"] == "parent"]
    lines = parents[-1]["output"].split("\n") if parents else []
    goal = next((i for i, line in enumerate(lines) if traces.is_goal_line(line)), None)
    segment = []  # the path written after that goal line, up to and including the next one
    for line in lines[goal + 1:] if goal is not None else []:
        segment.append(line)
        if traces.is_goal_line(line):
            break
    written = traces.path_operations("\n".join(segment))
    if not written:
        return "no path"
    if written in verified:
        return "operations right"
    agree = max(next((k for k, (a, b) in enumerate(zip(written, v)) if a != b), min(len(written), len(v)))
                for v in verified)
    return f"operation {agree + 1}"


def departures(results: Iterable[dict]) -> dict[str, int]:
    """Counts of :func:`departure` over results (the problems it does not apply to left out), by kind."""
    counts = collections.Counter(d for d in map(departure, results) if d is not None)
    return dict(sorted(counts.items()))


def assembly(results: Iterable[dict]) -> dict[str, int]:
    """Where APR answers come from: of the problems where some child returned a verified path
    (:func:`child_solved`), how many the parent turned into a verified answer (``assembled``), answered with a
    path that does not verify (``wrong_answer``) or left without an answer (``no_answer``); and how many the
    parent solved with no verified child path (``solved_without_child``)."""
    out = dict.fromkeys(("problems", "child_path", "assembled", "wrong_answer", "no_answer",
                         "solved_without_child"), 0)
    for r in results:
        out["problems"] += 1
        if not child_solved(r):
            out["solved_without_child"] += bool(r["correct"])
            continue
        out["child_path"] += 1
        key = "assembled" if r["correct"] else ("no_answer" if r.get("answer") is None else "wrong_answer")
        out[key] += 1
    return out


def summarize(results: Iterable[dict]) -> dict:
    """Accuracy and token statistics of a list of results (APR: also ``child_solved``, the fraction of
    problems where some child returned a verified path, see :func:`child_solved`)."""
    results = list(results)
    n = max(1, len(results))
    out = {"problems": len(results), "accuracy": sum(r["correct"] for r in results) / n,
           "mean_total_tokens": sum(r["total_tokens"] for r in results) / n,
           "mean_sequential_tokens": sum(r["sequential_tokens"] for r in results) / n,
           "mean_children": sum(r["children"] for r in results) / n}
    if any(r.get("mode") == "apr" for r in results):
        out["child_solved"] = sum(child_solved(r) for r in results) / n
    if results and "pass" in results[0]:
        out["pass_at_n"] = sum(r["pass"] for r in results) / n
        out["cons_at_n"] = out["accuracy"]
    stops = collections.Counter(t["stop"] for r in results for t in r["threads"])
    out["thread_stops"] = dict(sorted(stops.items()))
    return out
