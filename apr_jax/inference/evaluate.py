"""Evaluation: a trained run's model on the engine, many problems at once, results as JSON Lines."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Sequence

from apr_jax.countdown import traces
from apr_jax.inference.aid import make_aid
from apr_jax.inference.engine import Engine
from apr_jax.inference.runtime import Codec, RunConfig, Runtime, summarize
from apr_jax.inference.sampling import GREEDY, Sampling


def load_run_model(ckpt: str | Path, step: int | None = None):
    """``(model config, params, tokenizer)`` of a training run folder (its newest checkpoint by default)."""
    from apr_jax.data import tokenizer as tokenization
    from apr_jax.train.checkpoint import load_run

    model_cfg, params = load_run(ckpt, step=step)
    tok_path = Path(ckpt) / "tokenizer.json"
    if not tok_path.exists():
        raise FileNotFoundError(f"{tok_path} is missing: the run folder must hold the tokenizer it trained with")
    return model_cfg, params, tokenization.load_tokenizer(tok_path)


def load_problems(ckpt: str | Path | None, problems_file: str | Path | None, n: int | None) -> list[dict]:
    """The first ``n`` problems of ``problems_file`` (JSON or JSONL with ``nums`` and ``target``; the
    release's files load as they are), or of the validation split the run was trained beside."""
    from apr_jax.data import datasets
    from apr_jax.train.checkpoint import read_run_config

    if problems_file:
        problems = datasets.load_records(problems_file)
    else:
        if ckpt is None:
            raise ValueError("give a problems file or a run folder whose data has a validation split")
        data_dir = Path(read_run_config(ckpt)["data_dir"])
        problems = list(datasets.read_jsonl(data_dir / "problems_val.jsonl"))
    for i, p in enumerate(problems):
        if "nums" not in p or "target" not in p:
            raise ValueError(f"problem {i} of {problems_file or 'the validation split'} lacks nums/target: {p}")
    return problems[:n] if n else problems


def _strip(result: dict, keep_tokens: bool) -> dict:
    if not keep_tokens:
        for t in result["threads"]:
            for field in ("prompt_ids", "token_ids", "logprobs", "forced"):
                t.pop(field, None)
    return result


def evaluate(model_cfg, params, tokenizer, problems: Sequence[dict], run: RunConfig, *, slots: int = 16,
             context: int | None = None, sampling: Sampling = GREEDY, out: str | Path | None = None,
             keep_tokens: bool = False, progress: bool = True, resume: bool = True, aid: str = "none",
             backend: str | None = None, timeout: float = 120.0, kv_dtype: str = "float32"
             ) -> tuple[list[dict], dict]:
    """Solve ``problems`` with the engine; returns the per-problem results (input order) and a summary.

    With ``out``, each result is appended to ``out.partial`` as its problem finishes; at the end the results
    are written to ``out`` (JSON Lines, input order) and the summary to ``out`` with suffix
    ``.summary.json``. A killed evaluation keeps its partial file, and a rerun with ``resume`` (the default)
    solves only the problems it lacks: problems are matched by index and ``id``, and the runtime's seeded,
    per-thread keys make the missing results what an uninterrupted run would have produced.

    ``aid="arithmetic"`` turns on the labelled decoding aid of :mod:`apr_jax.inference.aid`; every result
    and the summary name the aid used.

    ``backend`` (a URL) decodes on a remote completions server (SGLang, ``apr-jax serve``) through
    :class:`apr_jax.inference.remote.RemoteEngine` instead of the in-process engine; ``slots`` is then the
    number of requests in flight. The aid needs the in-process engine. ``kv_dtype`` is the in-process
    engine's cache (:class:`apr_jax.inference.engine.Engine`; ``"bfloat16"`` halves its memory, not exact).
    """
    from apr_jax.data import tokenizer as tokenization

    _, bos, eos = tokenization.special_ids(tokenizer)
    codec = Codec(tokenizer, bos, eos)
    if backend is not None:
        from apr_jax.inference.remote import RemoteEngine

        if aid != "none":
            raise ValueError("the decoding aid runs inside the in-process engine; a remote backend cannot apply it")
        engine = RemoteEngine(backend, codec, context=context or model_cfg.max_seq_len, sampling=sampling,
                              stop=[traces.JOIN_OPEN], concurrency=slots, timeout=timeout)
    else:
        engine = Engine(model_cfg, params, slots=slots, eos_id=eos, context=context, sampling=sampling,
                        stop_sequences=[codec.ids(traces.JOIN_OPEN)], aid=make_aid(aid, codec), kv_dtype=kv_dtype)
    runtime = Runtime(engine, codec, run)
    keyed = [{**p, "id": p.get("id", i)} for i, p in enumerate(problems)]
    done: dict[object, dict] = {}
    partial = None if out is None else Path(str(out) + ".partial")
    settings = json.dumps({"run": dataclasses.asdict(run), "sampling": dataclasses.asdict(sampling),
                           "context": engine.context, "aid": aid, "backend": backend,
                           **({"kv_dtype": kv_dtype} if kv_dtype != "float32" else {})}, sort_keys=True)
    if partial is not None:
        partial.parent.mkdir(parents=True, exist_ok=True)
        header = Path(str(partial) + ".json")
        if partial.exists() and (not resume or not header.exists() or header.read_text() != settings):
            partial.unlink()  # another evaluation's leftovers: start over
        header.write_text(settings)
        if partial.exists():
            wanted = {p["id"] for p in keyed}
            for line in partial.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by the kill
                if record["problem"]["id"] in wanted and record["mode"] == run.mode:
                    done[record["problem"]["id"]] = record
        partial.write_text("".join(json.dumps(r) + "\n" for r in done.values()))
    todo = [p for p in keyed if p["id"] not in done]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(keyed), initial=len(done), desc=f"eval[{run.mode}]", unit="problem")
    solved = [sum(r["correct"] for r in done.values())]
    sink = None if partial is None else open(partial, "a", encoding="utf-8")

    def on_result(result: dict) -> None:
        result["aid"] = aid
        solved[0] += result["correct"]
        if sink is not None:
            sink.write(json.dumps(_strip(dict(result, threads=[dict(t) for t in result["threads"]]),
                                         keep_tokens)) + "\n")
            sink.flush()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(acc=f"{solved[0] / bar.n:.3f}", steps=engine.steps)

    t0 = time.perf_counter()
    try:
        fresh = runtime.solve(todo, on_result=on_result)
    finally:
        if sink is not None:
            sink.close()
    wall = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    by_id = {**done, **{r["problem"]["id"]: r for r in fresh}}
    results = [by_id[p["id"]] for p in keyed]
    generated = sum(t["tokens"] for r in fresh for t in r["threads"])
    summary = {"mode": run.mode, **summarize(results), "wall_s": round(wall, 2), "resumed_problems": len(done),
               "generated_tokens": generated, "generated_tokens_per_s": round(generated / max(wall, 1e-9), 1),
               "decode_steps": engine.steps, "dispatches": engine.dispatches, "slots": slots,
               "context": engine.context, "sampling": {"temperature": sampling.temperature, "top_k": sampling.top_k},
               "seed": run.seed, "samples": run.samples, "budgets": vars(run.budgets), "aid": aid,
               "backend": backend or "in-process", "backend_failures": getattr(engine, "failures", 0),
               "forced_tokens": engine.forced_tokens}
    results = [_strip(r, keep_tokens) for r in results]
    if out is not None:
        out = Path(out)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in results))
        tmp.replace(out)
        out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        partial.unlink()
        Path(str(partial) + ".json").unlink()
    return results, summary
