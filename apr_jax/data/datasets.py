"""Datasets: problems -> SoS+ and APR demonstrations -> JSON Lines + token arrays, in parallel and resumable.

Output folder::

    manifest.json                 config, counts, statistics, timings (written last: its presence = done)
    tokenizer.json
    problems_{train,val}.jsonl    nums, target, solution, start_size, id
    sosp_{train,val}.jsonl        the release's field names (search_path, rating, search_type, ...)
    apr_{train,val}.jsonl         ... plus trace_dict = {"main_calls": [...], "sub_calls": [[...]]}
    arrays/{sosp,apr}_{train,val}/  token arrays (apr_jax.data.arrays)

Work is cut into chunks of ``chunk_size`` problems; each finished chunk is written atomically under
``.parts/`` and skipped when a killed run is started again. Every random draw is seeded by (seed, method,
split, problem index), so the bytes do not depend on the number of workers.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from apr_jax.countdown import heuristics, solvers, traces
from apr_jax.countdown.problems import candidate, finish_split, rng_for, split_keys
from apr_jax.data import arrays, tokenizer as tokenization
from apr_jax.data.config import DataConfig

SPLITS = ("train", "val")
METHODS = ("sosp", "apr")
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------------------
# Small file helpers
# ---------------------------------------------------------------------------------------------------------


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_jsonl(path: str | Path) -> Iterator[dict]:
    """Records of a JSON Lines file; a malformed line raises an error naming the file and line."""
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err


def dumps(record: dict) -> str:
    return json.dumps(record, separators=(", ", ": "))


# ---------------------------------------------------------------------------------------------------------
# One problem -> demonstrations + token sequences
# ---------------------------------------------------------------------------------------------------------


def _rating(text: str, num_inputs: int, solved: bool) -> float:
    """The release's rating: 1 - explored operations / max operations, 0 when unsolved."""
    if not solved:
        return 0.0
    max_ops = {2: 4, 3: 48, 4: 1152, 5: 46080, 6: 2764800}.get(num_inputs)
    if max_ops is None:
        return 1.0
    return max(0.0, 1.0 - text.count(traces.EXPLORING) / max_ops)


def sosp_demo(cfg: DataConfig, problem: dict, split: str) -> dict:
    rng = rng_for(cfg.seed, "sosp", split, problem["id"])
    beam = rng.randint(1, cfg.sosp_max_beam)
    h = heuristics.get(cfg.heuristic)
    text = solvers.sosp(problem["nums"], problem["target"], beam, h, rng, cfg.sosp_subsearch_prob)
    solved = traces.solution_path(text) is not None
    return {**problem, "search_path": text, "rating": _rating(text, cfg.num_inputs, solved),
            "search_type": f"sosp_{beam}", "heuristic": h.__name__, "beam_size": beam, "solved": solved}


def apr_demo(cfg: DataConfig, problem: dict, split: str) -> dict:
    rng = rng_for(cfg.seed, "apr", split, problem["id"])
    beam = rng.randint(1, cfg.apr_max_beam)
    sub_beam = rng.randint(beam, cfg.apr_max_sub_beam) if cfg.apr_max_sub_beam > beam else cfg.apr_max_sub_beam
    h = heuristics.get(cfg.heuristic)
    trace_dict = solvers.apr(problem["nums"], problem["target"], beam, sub_beam, h, rng, cfg.apr_spawn_prob,
                             cfg.release_compat)
    text = trace_dict["main_calls"][-1]
    solved = traces.solution_path(text) is not None
    return {**problem, "search_path": text, "rating": _rating(text, cfg.num_inputs, solved),
            "search_type": f"apr_{beam}", "heuristic": h.__name__, "promising_threshold": cfg.apr_spawn_prob,
            "beam_size": beam, "sub_call_beam_size": sub_beam, "trace_dict": trace_dict, "solved": solved}


def apr_sequences(record: dict, condition_prefix: bool) -> list[tuple[int, str]]:
    """Training sequences of an APR demonstration: every parent call and every child call (the paper's SFT recipe)."""
    td = record["trace_dict"]
    spawns = len(td["sub_calls"])
    prefix = ""
    if condition_prefix:
        per_spawn = round(traces.count_children(td) / spawns) if spawns else 0
        prefix = traces.sub_call_budget_prefix(per_spawn)
    out = []
    for depth, text in traces.iter_calls(td):
        if depth == 0:
            out.append((arrays.KIND_APR_PARENT, prefix + text))
        else:
            out.append((arrays.KIND_APR_CHILD, text))
    return out


def _with_specials(ids: np.ndarray, bos: int = tokenization.BOS_ID, eos: int = tokenization.EOS_ID) -> np.ndarray:
    return np.concatenate([[bos], ids, [eos]]).astype(np.int32)


def _apr_token_stats(seqs: list[tuple[int, np.ndarray]]) -> dict:
    """The release's per-demonstration token statistics (with our tokenizer): total tokens with the
    prefix shared by consecutive parent calls counted once, longest sequence, children per spawn."""
    parents = [ids for kind, ids in seqs if kind == arrays.KIND_APR_PARENT]
    children = [ids for kind, ids in seqs if kind == arrays.KIND_APR_CHILD]
    total = sum(len(ids) for _, ids in seqs)
    for a, b in zip(parents[:-1], parents[1:]):
        n = min(len(a), len(b)) - 1  # the EOS of a never matches
        shared = int(np.argmin(np.concatenate([a[:n] == b[:n], [False]])))
        total -= shared
    return {
        "token_count": int(total),
        "longest_seq_token_count": int(max(len(ids) for _, ids in seqs)),
        "avg_seq_token_count": total / len(seqs),
        "avg_sub_seq_token_count": float(np.mean([len(c) for c in children])) if children else 0.0,
        "sub_call_count": len(children) / (len(parents) - 1) if len(parents) > 1 else 0,
    }


def _pack(seqs: list[tuple[int, int, np.ndarray]]) -> dict:
    """(kind, problem id, ids) list -> a part for arrays.write_arrays."""
    if not seqs:
        return {"tokens": np.zeros(0, np.int32), "lengths": [], "kinds": [], "problem_ids": []}
    return {"tokens": np.concatenate([s[2] for s in seqs]), "lengths": [len(s[2]) for s in seqs],
            "kinds": [s[0] for s in seqs], "problem_ids": [s[1] for s in seqs]}


# ---------------------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(cfg: DataConfig, tokenizer_path: str) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tok = tokenization.load_tokenizer(tokenizer_path)
    _WORKER["cfg"] = cfg
    _WORKER["encoder"] = tokenization.HFEncoder(tok) if cfg.tokenizer_file else tokenization.FastEncoder(tok)
    _WORKER["specials"] = tokenization.special_ids(tok)


def _problem_chunk(args: tuple) -> list[dict]:
    cfg, split, start, stop = args
    spec = cfg.problem_spec()
    return [candidate(spec, cfg.seed, split, i) for i in range(start, stop)]


def _demo_chunk(args: tuple) -> tuple[str, int, int]:
    """Make, tokenize and write one chunk of demonstrations; returns (split, chunk index, problems)."""
    split, chunk, problems, parts_dir = args
    cfg, enc = _WORKER["cfg"], _WORKER["encoder"]
    sosp_lines, apr_lines = [], []
    texts: list[str] = []
    owners: list[tuple[str, int, int]] = []  # (method, problem id, kind) per text
    records = []
    for problem in problems:
        s = sosp_demo(cfg, problem, split)
        a = apr_demo(cfg, problem, split)
        records.append((s, a))
        texts.append(s["search_path"])
        owners.append(("sosp", problem["id"], arrays.KIND_SOSP))
        for kind, text in apr_sequences(a, cfg.condition_prefix):
            texts.append(text)
            owners.append(("apr", problem["id"], kind))
    _, bos, eos = _WORKER["specials"]
    encoded = [_with_specials(ids, bos, eos) for ids in enc.encode_many(texts)]
    by_method: dict[str, list] = {"sosp": [], "apr": []}
    for (method, pid, kind), ids in zip(owners, encoded):
        by_method[method].append((kind, pid, ids))
    if cfg.condition_prefix:  # SoS+ budget prefix depends on the trace's own length
        conditioned = []
        for kind, pid, ids in by_method["sosp"]:
            budget = traces.token_budget(len(ids), cfg.context)
            prefix = enc.encode(traces.token_budget_prefix(budget))
            conditioned.append((kind, pid, np.concatenate([ids[:1], prefix, ids[1:]]).astype(np.int32)))
        by_method["sosp"] = conditioned
    apr_by_problem: dict[int, list] = {}
    for kind, pid, ids in by_method["apr"]:
        apr_by_problem.setdefault(pid, []).append((kind, ids))
    for (s, a), (_, _, sosp_ids) in zip(records, by_method["sosp"]):
        s["token_count"] = int(len(sosp_ids))
        a.update(_apr_token_stats(apr_by_problem[a["id"]]))
        sosp_lines.append(dumps(s))
        apr_lines.append(dumps(a))
    base = Path(parts_dir) / f"{split}_{chunk:06d}"
    for method, lines in (("sosp", sosp_lines), ("apr", apr_lines)):
        atomic_write_text(base.with_name(base.name + f".{method}.jsonl"), "\n".join(lines) + "\n")
        part = _pack(by_method[method])
        tmp = base.with_name(base.name + f".{method}.tmp.npz")
        np.savez(tmp, tokens=part["tokens"].astype(np.int32), lengths=np.asarray(part["lengths"], np.int64),
                 kinds=np.asarray(part["kinds"], np.uint8), problem_ids=np.asarray(part["problem_ids"], np.int64))
        os.replace(tmp, base.with_name(base.name + f".{method}.npz"))
    atomic_write_text(base.with_name(base.name + ".done"), f"{len(problems)}\n")
    return split, chunk, len(problems)


def _pool(workers: int, initializer=None, initargs=()):
    # fork is cheapest, but forking a process that runs JAX's threads can deadlock: then use forkserver
    method = "fork" if hasattr(os, "fork") and "jax" not in sys.modules else "forkserver"
    ctx = mp.get_context(method if method in mp.get_all_start_methods() else "spawn")
    return ctx.Pool(workers, initializer=initializer, initargs=initargs)


# ---------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _make_problems(cfg: DataConfig, out: Path, workers: int, progress: bool) -> dict[str, list[dict]]:
    result: dict[str, list[dict]] = {}
    taken: set = set()
    spec = cfg.problem_spec()
    for split, n in (("train", cfg.num_train), ("val", cfg.num_val)):
        path = out / f"problems_{split}.jsonl"
        if path.exists():
            result[split] = list(read_jsonl(path))
            if len(result[split]) != n:
                raise ValueError(f"{path} holds {len(result[split])} problems, the config asks for {n}: "
                                 "use a fresh --out folder")
        else:
            tasks = [(cfg, split, a, b) for a, b in _chunks(n, cfg.chunk_size)]
            drawn: list[dict] = []
            bar = tqdm(total=n, desc=f"problems {split}", unit="pb", disable=not progress)
            if workers > 1 and len(tasks) > 1:
                with _pool(workers) as pool:
                    for chunk in pool.imap(_problem_chunk, tasks):
                        drawn += chunk
                        bar.update(len(chunk))
            else:
                for t in tasks:
                    drawn += _problem_chunk(t)
                    bar.update(t[3] - t[2])
            bar.close()
            problems = finish_split(spec, cfg.seed, split, drawn, taken)
            atomic_write_text(path, "".join(dumps(p) + "\n" for p in problems))
            result[split] = problems
        taken |= split_keys(result[split])
    return result


def _concat_jsonl(sources: list[Path], dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    with open(tmp, "wb") as w:
        for src in sources:
            with open(src, "rb") as r:
                shutil.copyfileobj(r, w)
    os.replace(tmp, dest)


def _iter_parts(paths: list[Path]) -> Iterable[dict]:
    for p in paths:
        with np.load(p) as z:
            yield {k: z[k] for k in ("tokens", "lengths", "kinds", "problem_ids")}


def _stats(out: Path, split: str, context: int) -> dict:
    stats = {}
    for method in METHODS:
        src = arrays.TokenArraySource(out / "arrays" / f"{method}_{split}")
        recs = list(read_jsonl(out / f"{method}_{split}.jsonl"))
        lengths = src.lengths
        entry = {"demonstrations": len(recs), "sequences": len(src), "tokens": int(lengths.sum()),
                 "solved_fraction": float(np.mean([r["solved"] for r in recs])) if recs else 0.0,
                 "mean_tokens_per_demonstration": float(np.mean([r["token_count"] for r in recs])) if recs else 0.0,
                 "mean_sequence_tokens": float(lengths.mean()) if len(lengths) else 0.0,
                 "max_sequence_tokens": int(lengths.max()) if len(lengths) else 0,
                 "fraction_of_sequences_over_context": float(np.mean(lengths > context)) if len(lengths) else 0.0}
        if method == "apr" and recs:
            entry["mean_longest_call_tokens"] = float(np.mean([r["longest_seq_token_count"] for r in recs]))
            entry["p90_longest_call_tokens"] = float(np.percentile([r["longest_seq_token_count"] for r in recs], 90))
            entry["mean_children"] = float(np.mean([traces.count_children(r["trace_dict"]) for r in recs]))
        if method == "sosp" and recs:
            entry["p90_tokens"] = float(np.percentile([r["token_count"] for r in recs], 90))
        stats[method] = entry
    return stats


def generate(cfg: DataConfig, out_dir: str | Path, workers: int = 1, progress: bool = True) -> dict:
    """Write the whole dataset for ``cfg`` into ``out_dir``; resumes a killed run; returns the manifest."""
    out = Path(out_dir)
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("config") != dataclasses.asdict(cfg):
            raise ValueError(f"{out} already holds a dataset made with another config; use a fresh --out")
        return manifest
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.json"
    if config_path.exists() and json.loads(config_path.read_text()) != dataclasses.asdict(cfg):
        raise ValueError(f"{out} holds a partial dataset made with another config; use a fresh --out")
    atomic_write_text(config_path, json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")
    t0 = time.perf_counter()
    if cfg.tokenizer_file:
        tok = tokenization.load_tokenizer(cfg.tokenizer_file)
        tokenization.special_ids(tok)  # fails early, naming what is missing
    else:
        tok = tokenization.build_tokenizer(cfg.number_mode, cfg.max_int_digits)
    tokenization.save_tokenizer(tok, out / "tokenizer.json")

    problems = _make_problems(cfg, out, workers, progress)
    t_problems = time.perf_counter() - t0

    parts = out / ".parts"
    parts.mkdir(exist_ok=True)
    tasks = []
    for split in SPLITS:
        for chunk, (a, b) in enumerate(_chunks(len(problems[split]), cfg.chunk_size)):
            if not (parts / f"{split}_{chunk:06d}.done").exists():
                tasks.append((split, chunk, problems[split][a:b], str(parts)))
    total = sum(len(t[2]) for t in tasks)
    t1 = time.perf_counter()
    bar = tqdm(total=total, desc="demonstrations", unit="pb", disable=not progress)
    if workers > 1 and len(tasks) > 1:
        with _pool(workers, _init_worker, (cfg, str(out / "tokenizer.json"))) as pool:
            for _, _, n in pool.imap_unordered(_demo_chunk, tasks):
                bar.update(n)
    else:
        _init_worker(cfg, str(out / "tokenizer.json"))
        for t in tasks:
            bar.update(_demo_chunk(t)[2])
    bar.close()
    t_demos = time.perf_counter() - t1

    vocab = tokenization.vocab_size(tok)
    pad, bos, eos = tokenization.special_ids(tok)
    for split in SPLITS:
        n_chunks = len(_chunks(len(problems[split]), cfg.chunk_size))
        names = [parts / f"{split}_{c:06d}" for c in range(n_chunks)]
        for method in METHODS:
            _concat_jsonl([n.with_name(n.name + f".{method}.jsonl") for n in names], out / f"{method}_{split}.jsonl")
            arrays.write_arrays(out / "arrays" / f"{method}_{split}",
                                _iter_parts([n.with_name(n.name + f".{method}.npz") for n in names]),
                                vocab_size=vocab, bos_id=bos, eos_id=eos, pad_id=pad)
    shutil.rmtree(parts)
    elapsed = time.perf_counter() - t0
    n_problems = cfg.num_train + cfg.num_val
    manifest = {
        "format_version": FORMAT_VERSION,
        "config": dataclasses.asdict(cfg),
        "vocab_size": vocab,
        "counts": {s: len(problems[s]) for s in SPLITS},
        "stats": {s: _stats(out, s, cfg.context) for s in SPLITS},
        "timing": {"problems_s": round(t_problems, 2), "demonstrations_s": round(t_demos, 2),
                   "total_s": round(elapsed, 2), "workers": workers,
                   "problems_per_s": round(n_problems / elapsed, 1),
                   "demonstrations_resumed": total < n_problems},
    }
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1) + "\n")
    return manifest


# ---------------------------------------------------------------------------------------------------------
# Import of the official release's files
# ---------------------------------------------------------------------------------------------------------


def load_records(path: str | Path) -> list[dict]:
    """A JSON list (the release writes ``json.dump(results, indent=...)``) or a JSON Lines file."""
    path = Path(path)
    text = path.read_text()
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from err
        if not all(isinstance(r, dict) for r in data):
            raise ValueError(f"{path}: expected a list of objects")
        return data
    return list(read_jsonl(path))


def import_official(out_dir: str | Path, split: str, *, problems: str | None = None, sosp: str | None = None,
                    apr: str | None = None, number_mode: str = "digits", max_int_digits: int = 4) -> dict:
    """Convert the release's problem / SoS+ / APR files of one split into our layout (JSONL + arrays).

    APR records are checked with :func:`traces.check_demonstration`; a malformed record is skipped and
    reported (file, index, reason), never silently kept. Returns a report with counts and rejects.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok_path = out / "tokenizer.json"
    if tok_path.exists():
        tok = tokenization.load_tokenizer(tok_path)
    else:
        tok = tokenization.build_tokenizer(number_mode, max_int_digits)
        tokenization.save_tokenizer(tok, tok_path)
    enc = tokenization.FastEncoder(tok)
    report: dict = {"split": split, "rejected": []}
    for kind, path in (("problems", problems), ("sosp", sosp), ("apr", apr)):
        if path is None:
            continue
        kept, seqs = [], []
        for i, rec in enumerate(load_records(path)):
            try:
                if "nums" not in rec or "target" not in rec:
                    raise traces.TraceFormatError("record has no 'nums'/'target'")
                rec = {**rec, "id": i}
                if kind == "sosp":
                    if not isinstance(rec.get("search_path"), str):
                        raise traces.TraceFormatError("record has no 'search_path' string")
                    rec.setdefault("solved", traces.solution_path(rec["search_path"]) is not None)
                    seqs.append((arrays.KIND_SOSP, i, rec["search_path"]))
                elif kind == "apr":
                    traces.check_demonstration(rec.get("trace_dict") or {})
                    rec.setdefault("solved", traces.solution_path(rec["trace_dict"]["main_calls"][-1]) is not None)
                    seqs += [(k, i, t) for k, t in apr_sequences(rec, condition_prefix=False)]
            except (traces.TraceFormatError, KeyError, TypeError) as err:
                report["rejected"].append({"file": str(path), "index": i, "reason": str(err)})
                continue
            kept.append(rec)
        name = f"problems_{split}.jsonl" if kind == "problems" else f"{kind}_{split}.jsonl"
        atomic_write_text(out / name, "".join(dumps(r) + "\n" for r in kept))
        if seqs:
            ids = [_with_specials(x) for x in enc.encode_many([s[2] for s in seqs])]
            arrays.write_arrays(out / "arrays" / f"{kind}_{split}", [_pack([(k, p, x) for (k, p, _), x in zip(seqs, ids)])],
                                vocab_size=tokenization.vocab_size(tok), bos_id=tokenization.BOS_ID,
                                eos_id=tokenization.EOS_ID, pad_id=tokenization.PAD_ID)
        report[kind] = len(kept)
    return report
