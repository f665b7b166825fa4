"""Decode throughput: our slot engine vs ``transformers`` ``generate`` (KV cache, CPU), same weights.

Usage::

    python experiments/bench_decode.py --out runs/bench_decode.json        # mini model, 16 and 64 threads
    python experiments/bench_decode.py --ckpt runs/mini_sft_apr --threads 16 --new-tokens 256

What is measured, each in its own subprocess (clean thread pools and peak memory):

* ``engine``: :class:`apr_jax.inference.engine.Engine` with one slot per thread and the model's full context
  (4,096 for mini), greedy, EOS disabled so that every thread decodes exactly ``--new-tokens`` tokens;
  wall time from submission to the last finished thread, after a warm-up run of the same shapes (compiles
  excluded).
* ``hf``: the same parameters exported with :func:`apr_jax.export.hf.export_hf` and loaded as
  ``transformers.LlamaForCausalLM``; ``generate(do_sample=False, min_new_tokens=max_new_tokens=N)`` on the
  left-padded batch with its default dynamic KV cache, ``torch.set_num_threads(cpu_count)``, after one
  warm-up call.
* ``engine_xla_attention`` (ablation, unless ``--no-ablation``): the engine with ``APR_JAX_CPU_KERNELS=0``,
  i.e. XLA's attention and matmuls instead of the fused CPU kernels (:mod:`apr_jax.model.cpu_kernels`).
* ``batching``: engine wall time for 10 threads of ``--new-tokens`` decoded together vs 1 alone (the cost of
  a spawn's children relative to one child), with the default fp32 KV cache and with the opt-in bf16 cache
  (``Engine(kv_dtype="bfloat16")``: a many-row decode step on CPU is bound by memory traffic through the
  cache, which bf16 halves), and an ablation where attention reads one cached key per row instead of all of
  them (the tokens are then not the model's; what is left is the cost of the projections and the rest of the
  step: docs/inference.md). ``--only-batching`` measures only this.

Each measurement is the median of ``--repeats`` timed runs (default 3). Prompts are real APR child prompts
(``Moving to Node #0,k`` + ``Current State ...``) of random problems.
Both decoders must produce the same greedy tokens; the script checks that on every thread.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` child prompts of random 4-number problems, as an APR parent would spawn them."""
    import random

    from apr_jax.countdown import traces

    rng = random.Random(seed)
    out = []
    for k in range(n):
        nums = [rng.randint(1, 99) for _ in range(4)]
        a, b = nums[0], nums[1]
        rest = [nums[2], nums[3], a + b]
        target = rng.randint(10, 100)
        # what traces.child_prompt builds from a parent's "Generated Node #0,k" line (no trailing newline)
        out.append(traces.moving_line(f"0,{k}") + traces.state_line(target, rest, [f"{a}+{b}={a + b}"])[:-1])
    return out


def load_model(args):
    import dataclasses

    import jax

    from apr_jax import presets
    from apr_jax.data import tokenizer as tokenization
    from apr_jax.model import init

    if args.ckpt:
        from apr_jax.inference.evaluate import load_run_model
        return load_run_model(args.ckpt)
    preset = presets.load(args.model)
    tok = tokenization.build_tokenizer(preset.data.number_mode, preset.data.max_int_digits)
    cfg = dataclasses.replace(preset.model)
    return cfg, init(cfg, jax.random.PRNGKey(0)), tok


def run_engine(args, threads: int) -> dict:
    import jax
    import jax.numpy as jnp

    from apr_jax.inference.engine import Engine
    from apr_jax.inference.runtime import Codec
    from apr_jax.inference.sampling import thread_key
    from apr_jax.data import tokenizer as tokenization

    cfg, params, tok = load_model(args)
    _, bos, _ = tokenization.special_ids(tok)
    codec = Codec(tok, bos, -1)
    prompts = [codec.prompt_ids(p) for p in child_prompts(threads)]
    if args.worker == "engine_one_key":  # ablation: each row's attention reads one cached key, not all
        from apr_jax.model import cpu_kernels as kernels

        full = kernels.decode_attention
        kernels.decode_attention = lambda q, k, v, layer, limit, scale: full(q, k, v, layer,
                                                                            jnp.minimum(limit, 1), scale)

    def once(new_tokens: int) -> tuple[float, dict]:
        # no EOS: every thread decodes new_tokens
        engine = Engine(cfg, params, slots=threads, eos_id=-1, kv_dtype=args.kv_dtype)
        jax.block_until_ready(engine.state)  # the cache is allocated once per engine, not per request
        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            engine.submit(i, p, new_tokens, thread_key(0, 0, str(i)))
        done = {}
        while not engine.idle:
            for f in engine.step():
                done[f.key] = f.tokens
                engine.release(f.key)
        jax.block_until_ready(engine.state.cache.k)
        return time.perf_counter() - t0, done

    from apr_jax.model import cpu_kernels

    once(args.new_tokens)  # compile every shape of the measured run
    walls = []
    for _ in range(args.repeats):
        wall, done = once(args.new_tokens)
        walls.append(wall)
    tokens = [done[i] for i in range(threads)]
    assert all(len(t) == args.new_tokens for t in tokens)
    return {**_timing(walls, threads * args.new_tokens), "tokens": tokens,
            "decode_kernel": bool(cpu_kernels.available() and jax.default_backend() == "cpu"),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _timing(walls: list[float], tokens: int) -> dict:
    """The median of the timed runs (and every run), so one disturbed run on a shared machine moves nothing."""
    wall = sorted(walls)[len(walls) // 2]
    return {"wall_s": wall, "tokens_per_s": tokens / wall, "walls_s": walls}


def run_hf(args, threads: int) -> dict:
    import torch
    import transformers

    from apr_jax.data import tokenizer as tokenization
    from apr_jax.export.hf import export_hf
    from apr_jax.inference.runtime import Codec

    torch.set_num_threads(os.cpu_count() or 1)
    cfg, params, tok = load_model(args)
    pad, bos, eos = tokenization.special_ids(tok)
    codec = Codec(tok, bos, eos)
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(cfg, params, tmp)
        model = transformers.LlamaForCausalLM.from_pretrained(tmp, torch_dtype=torch.float32).eval()
    prompts = [codec.prompt_ids(p) for p in child_prompts(threads)]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def once(new_tokens: int):
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, pad_token_id=pad, eos_token_id=None, use_cache=True)

    once(8)
    walls = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = once(args.new_tokens)
        walls.append(time.perf_counter() - t0)
    return {**_timing(walls, threads * args.new_tokens), "tokens": out[:, width:].tolist(),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def worker(args) -> None:
    fn = {"engine": run_engine, "engine_xla": run_engine, "engine_one_key": run_engine, "hf": run_hf}[args.worker]
    print(json.dumps(fn(args, args.worker_threads)))


def spawn(args, kind: str, threads: int, kv_dtype: str = "float32") -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--worker-threads", str(threads),
           "--new-tokens", str(args.new_tokens), "--model", args.model, "--repeats", str(args.repeats),
           "--kv-dtype", kv_dtype]
    if args.ckpt:
        cmd += ["--ckpt", args.ckpt]
    env = dict(os.environ)
    if kind == "engine_xla":  # the engine with XLA's attention and matmuls instead of the CPU kernels
        env["APR_JAX_CPU_KERNELS"] = "0"
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if res.returncode:
        raise RuntimeError(f"{kind} worker failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mini", help="preset whose model is benchmarked (random weights)")
    p.add_argument("--ckpt", help="a training run folder instead (its newest checkpoint)")
    p.add_argument("--threads", default="16,64", help="concurrent threads, comma-separated")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (the median is reported)")
    p.add_argument("--no-ablation", action="store_true",
                   help="skip the engine run without the fused CPU kernels")
    p.add_argument("--out", help="write the results as JSON")
    p.add_argument("--only-batching", action="store_true", help="measure only the 1-vs-10-children batching")
    p.add_argument("--batching-rounds", type=int, default=3, help="alternating rounds of the batching measurement")
    p.add_argument("--kv-dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-threads", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path.home() / ".cache" / "apr_jax" / "jax"))
    report = {"model": args.ckpt or args.model, "new_tokens": args.new_tokens, "cpus": os.cpu_count(), "runs": []}
    for threads in [] if args.only_batching else [int(t) for t in args.threads.split(",")]:
        ours, hf = spawn(args, "engine", threads), spawn(args, "hf", threads)
        hf_tokens = hf.pop("tokens")
        same = sum(a == b for a, b in zip(ours.pop("tokens"), hf_tokens))
        row = {"threads": threads, "engine": ours, "hf": hf, "speedup": ours["tokens_per_s"] / hf["tokens_per_s"],
               "threads_with_identical_tokens": same}
        line = (f"{threads:3d} threads x {args.new_tokens} tokens: engine {ours['tokens_per_s']:7.0f} tok/s "
                f"({ours['wall_s']:.2f} s, {ours['peak_rss_mib']:.0f} MiB) | transformers {hf['tokens_per_s']:7.0f} "
                f"tok/s ({hf['wall_s']:.2f} s, {hf['peak_rss_mib']:.0f} MiB) | {row['speedup']:.2f}x | "
                f"identical greedy tokens in {same}/{threads} threads")
        if not args.no_ablation:
            xla = spawn(args, "engine_xla", threads)
            same_xla = sum(a == b for a, b in zip(xla.pop("tokens"), hf_tokens))
            row["engine_xla_attention"] = {**xla, "threads_with_identical_tokens": same_xla}
            line += f" | without the CPU kernels {xla['tokens_per_s']:.0f} tok/s"
        report["runs"].append(row)
        print(line, flush=True)
    # the cost of 10 children vs 1, with the exact fp32 cache, with the opt-in bf16 cache and (ablation) with
    # attention over one key per row; rounds alternate the variants so that a slow interval of a shared machine
    # hits all of them, and each ratio pairs runs of one round
    variants = {"float32": ("engine", "float32", "fp32 KV cache"), "bfloat16": ("engine", "bfloat16", "bf16 KV cache"),
                "one_key": ("engine_one_key", "float32", "ablation: attention over 1 key per row")}
    ratios: dict[str, list[float]] = {name: [] for name in variants}
    rounds = []
    for _ in range(args.batching_rounds):
        row = {}
        for name, (kind, kv_dtype, label) in variants.items():
            one, ten = spawn(args, kind, 1, kv_dtype), spawn(args, kind, 10, kv_dtype)
            row[name] = {"one_child_s": one["wall_s"], "ten_children_s": ten["wall_s"],
                         "ratio": ten["wall_s"] / one["wall_s"]}
            ratios[name].append(ten["wall_s"] / one["wall_s"])
            print(f"batching ({label}): 10 children x {args.new_tokens} tokens in {ten['wall_s']:.3f} s "
                  f"vs 1 child in {one['wall_s']:.3f} s: {ten['wall_s'] / one['wall_s']:.2f}x", flush=True)
        rounds.append(row)
    report["batching"] = {"rounds": rounds, **{f"median_ratio_{k}": sorted(v)[len(v) // 2] for k, v in ratios.items()}}
    print("batching, median over rounds: " + ", ".join(f"{k} {report['batching'][f'median_ratio_{k}']:.2f}x"
                                                        for k in ratios))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
