"""Throughput and latency of `apr-jax serve` under a bounded load of APR problems, beside the in-process engine.

    python experiments/bench_serve.py --ckpt runs/demo/sft_apr --problems 32 --slots 16 --context 1024 \\
        --out runs/bench_serve.json

The server runs as a second process (``apr-jax serve --port 0``) on loopback; this process drives the APR
runtime through :class:`apr_jax.inference.remote.RemoteEngine` with at most ``--slots`` requests in flight
(so at most that many threads, of as many problems as fit, are decoded at once by the server's engine of
``--slots`` slots). Then the same problems run on the in-process engine with the same number of slots. Each
side first solves ``--warmup`` other problems (compilation excluded). Reported per side: problems/s, generated
tokens/s, and per-problem latency (first request sent to last thread finished) p50 / p99; the greedy thread
trees of both sides are compared.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _stats(results: list[dict], wall: float) -> dict:
    import numpy as np

    lat = np.array([r["wall_s"] for r in results])
    generated = sum(t["tokens"] for r in results for t in r["threads"])
    return {"problems": len(results), "wall_s": round(wall, 2), "problems_per_s": round(len(results) / wall, 3),
            "generated_tokens_per_s": round(generated / wall, 1), "latency_p50_s": round(float(np.percentile(lat, 50)), 2),
            "latency_p99_s": round(float(np.percentile(lat, 99)), 2), "accuracy": float(np.mean([r["correct"] for r in results])),
            "mean_children": float(np.mean([r["children"] for r in results]))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="an APR run folder")
    p.add_argument("--problems", type=int, default=32)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--out", help="JSON file for the numbers")
    args = p.parse_args()

    from apr_jax.countdown import traces
    from apr_jax.data import tokenizer as tokenization
    from apr_jax.inference import evaluate as ev
    from apr_jax.inference.engine import Engine
    from apr_jax.inference.remote import RemoteEngine
    from apr_jax.inference.runtime import Codec, RunConfig, Runtime

    model_cfg, params, tok = ev.load_run_model(args.ckpt)
    _, bos, eos = tokenization.special_ids(tok)
    codec = Codec(tok, bos, eos)
    problems = ev.load_problems(args.ckpt, None, args.warmup + args.problems)
    warm, timed = problems[:args.warmup], problems[args.warmup:]
    run = RunConfig(mode="apr")

    server = subprocess.Popen([sys.executable, "-m", "apr_jax.cli", "serve", "--ckpt", args.ckpt, "--port", "0",
                               "--slots", str(args.slots), "--context", str(args.context)],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = server.stdout.readline()
        if "serving" not in line:
            raise SystemExit(f"the server did not start: {line!r}")
        url = line.split(" on ")[1].split()[0]
        remote = RemoteEngine(url, codec, context=args.context, concurrency=args.slots, stop=[traces.JOIN_OPEN])
        Runtime(remote, codec, run).solve(warm)
        remote = RemoteEngine(url, codec, context=args.context, concurrency=args.slots, stop=[traces.JOIN_OPEN])
        t0 = time.perf_counter()
        served = Runtime(remote, codec, run).solve(timed)
        served_stats = _stats(served, time.perf_counter() - t0)
        served_stats["failures"] = remote.failures
    finally:
        server.terminate()
        server.wait(timeout=60)

    def engine():
        return Engine(model_cfg, params, slots=args.slots, eos_id=eos, context=args.context,
                      stop_sequences=[codec.ids(traces.JOIN_OPEN)])

    Runtime(engine(), codec, run).solve(warm)
    t0 = time.perf_counter()
    local = Runtime(engine(), codec, run).solve(timed)
    local_stats = _stats(local, time.perf_counter() - t0)

    def tree(r):
        return [(t["path"], t["output"], t["stop"]) for t in r["threads"]]

    same = sum(tree(a) == tree(b) for a, b in zip(served, local))
    out = {"ckpt": args.ckpt, "slots": args.slots, "context": args.context, "served": served_stats,
           "in_process": local_stats, "identical_trees": f"{same}/{len(timed)}"}
    print(f"{'':12} {'problems/s':>10} {'tokens/s':>9} {'p50 s':>7} {'p99 s':>7}")
    for name, s in (("apr-jax serve", served_stats), ("in-process", local_stats)):
        print(f"{name:12} {s['problems_per_s']:>10.3f} {s['generated_tokens_per_s']:>9.0f} "
              f"{s['latency_p50_s']:>7.2f} {s['latency_p99_s']:>7.2f}")
    print(f"identical greedy thread trees: {same}/{len(timed)}")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
