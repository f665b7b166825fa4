"""Training-step throughput: our jitted SFT step vs ``transformers.LlamaForCausalLM`` + ``torch.optim.AdamW``.

Usage::

    python experiments/bench_train.py --out runs/bench_train.json            # mini model, 512x8 and 1024x8
    python experiments/bench_train.py --shapes 256x16 --model tiny --steps 10

Every measurement runs in its own subprocess (clean peak-RSS numbers, no thread-pool interference):

* ``jax``: :func:`apr_jax.train.sft.compile_fns` step on one device (AdamW, clipping, fp32 loss), full-length
  rows (no padding), timed per step after ``--warmup`` steps; the median is reported.
* ``torch``: the same architecture built from our config (random init, SDPA attention), AdamW with the same
  hyper-parameters and gradient clipping, ``torch.set_num_threads(cpu_count)``.
* ``matmul``: the machine's measured f32 matmul peak (best of square ``jnp`` matmuls, and torch's for
  reference).

Model FLOPs per token = ``6 * P_mm + 6 * L * T * N * H``: ``P_mm`` = the parameters used in matmuls (attention
and MLP weights of every layer plus the output head; not the embedding lookup or norms), and the second
term is causal attention (QK^T and PV, each 2*T*N*H FLOPs per token for a full context, halved by the causal
mask, times 3 for forward + backward). MFU = tokens/s * FLOPs/token / measured matmul peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def model_config(name: str, vocab: int | None, dtype: str):
    """The model of preset ``name`` (its vocabulary unless ``vocab`` is given), in ``dtype``."""
    from apr_jax import presets

    cfg = presets.load(name).model
    changes = {"dtype": dtype} if vocab is None else {"dtype": dtype, "vocab_size": vocab}
    return dataclasses.replace(cfg, **changes)


def flops_per_token(cfg, seq_len: int) -> float:
    d, h, n, k, f = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
    p_mm = cfg.num_layers * (d * h * (2 * n + 2 * k) + 3 * d * f) + d * cfg.vocab_size
    return 6.0 * p_mm + 6.0 * cfg.num_layers * seq_len * n * h


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ------------------------------------------------------------------------------------------- workers
def patch_model(no_attention: bool, flat_matmul: bool) -> None:
    """Experiments on the model, by monkeypatching (the model files are not changed):

    * ``no_attention``: attention replaced by the identity on q (measures everything else);
    * ``flat_matmul``: the projection / MLP / head einsums ``BT<c>,<c><o>->BT<o>`` computed as one 2-D
      ``jnp.dot`` of ``[B*T, prod(c)] @ [prod(c), prod(o)]`` (same values; XLA:CPU otherwise transposes
      operands in the backward pass and runs these dots about 2x slower).
    """
    import math

    import jax.numpy as jnp

    from apr_jax.model import llama

    if no_attention:
        llama.attention = lambda cfg, q, k, v, spec: q
    if flat_matmul:
        einsum_matmul = llama._matmul

        def matmul(cfg, subscripts, x, w):
            lhs, rest = subscripts.split(",")
            rhs, out = rest.split("->")
            contract = lhs[2:]
            if lhs[:2] != "BT" or out[:2] != "BT" or rhs != contract + out[2:]:
                return einsum_matmul(cfg, subscripts, x, w)
            dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
            k = math.prod(x.shape[2:])
            y = jnp.dot(x.reshape(-1, k).astype(dtype), w.reshape(k, -1).astype(dtype),
                        preferred_element_type=jnp.float32)
            return y.reshape(*x.shape[:2], *w.shape[len(contract):])

        llama._matmul = matmul


def jax_stepper(args):
    """``(step, info)``: one blocking SFT step of our jitted train step (compiled and warmed once)."""
    import jax
    import numpy as np

    from apr_jax.train import sft
    from apr_jax.train import sharding as sh
    from apr_jax.train.config import SFTConfig

    cfg = model_config(args.model, args.vocab, args.dtype)
    if args.attention_block:
        cfg = dataclasses.replace(cfg, attention_block=args.attention_block)
    if args.no_attention or args.flat_matmul:
        patch_model(no_attention=args.no_attention, flat_matmul=args.flat_matmul)
    sft_cfg = SFTConfig(batch_size=args.batch, grad_accum=args.grad_accum, seq_len=args.seq, steps=1000,
                        mesh=(1, 1), pad_policy="max")
    mesh = sh.make_mesh((1, 1), jax.devices()[:1])
    t0 = time.perf_counter()
    fns = sft.compile_fns(cfg, sft_cfg, sft_cfg.steps, mesh)
    box = {"state": sft.init_state(fns, jax.random.PRNGKey(0))}
    tokens = np.random.default_rng(0).integers(4, cfg.vocab_size, (args.batch, args.seq), dtype=np.int32)
    tokens[:, 0] = 1
    batch = sh.shard_batch({
        "tokens": tokens,
        "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32), tokens.shape).copy(),
        "segment_ids": np.ones_like(tokens),
        "loss_mask": np.ones(tokens.shape, bool),
    }, mesh)

    def step():
        box["state"], box["metrics"] = fns.step(box["state"], batch)
        jax.block_until_ready((box["state"], box["metrics"]))

    step()
    info = {"compile_s": time.perf_counter() - t0, "jax": jax.__version__, "params": cfg.num_params(),
            "loss": lambda: float(box["metrics"]["loss"])}
    return step, info


def torch_stepper(args):
    """``(step, info)``: one step of ``LlamaForCausalLM`` (same shapes) + clipping + ``torch.optim.AdamW``."""
    import torch
    import transformers

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    cfg = model_config(args.model, args.vocab, "float32")
    hf = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, initializer_range=cfg.init_std,
    )
    model = transformers.LlamaForCausalLM._from_config(hf, attn_implementation="sdpa")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    tokens = torch.randint(4, cfg.vocab_size, (args.batch, args.seq))
    tokens[:, 0] = 1
    box = {}

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        box["loss"] = loss

    t0 = time.perf_counter()
    step()
    info = {"compile_s": time.perf_counter() - t0, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "params": sum(p.numel() for p in model.parameters()), "loss": lambda: float(box["loss"])}
    return step, info


def time_steps(steppers: dict, warmup: int, steps: int) -> dict:
    """Time the steppers' steps, alternating between them (so they share the machine's load)."""
    times = {name: [] for name in steppers}
    for i in range(warmup + steps):
        for name, (step, _) in steppers.items():
            t = time.perf_counter()
            step()
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
    out = {}
    for name, (_, info) in steppers.items():
        info = dict(info, loss=info["loss"]())
        out[name] = dict(info, step_s=statistics.median(times[name]), step_min_s=min(times[name]),
                         step_times_s=times[name], peak_rss_mib=peak_rss_mib())
    return out


def matmul_stepper(args, size: int = 2048):
    """``(step, info)``: a large f32 ``jnp`` matmul, timed alongside the training steps (same load)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    return (lambda: f(a).block_until_ready()), {"flops": 2 * size**3, "loss": lambda: 0.0}


def worker_steps(args) -> dict:
    """``--worker jax|torch|pair``: pair builds both and alternates their steps (and a reference matmul)."""
    makers = {"jax": jax_stepper, "torch": torch_stepper}
    names = ("jax", "torch") if args.worker == "pair" else (args.worker,)
    steppers = {name: makers[name](args) for name in names}
    if "jax" in names:
        steppers["matmul"] = matmul_stepper(args)
    return time_steps(steppers, args.warmup, args.steps)


def worker_matmul(args) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    out = {}
    for size in (1024, 2048, 3072):
        a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
        f = jax.jit(lambda x: x @ x)
        f(a).block_until_ready()
        times = []
        for _ in range(5):
            t = time.perf_counter()
            f(a).block_until_ready()
            times.append(time.perf_counter() - t)
        out[f"jax_{size}"] = 2 * size**3 / min(times)
        ta = torch.randn(size, size)
        ta @ ta
        times = []
        for _ in range(5):
            t = time.perf_counter()
            ta @ ta
            times.append(time.perf_counter() - t)
        out[f"torch_{size}"] = 2 * size**3 / min(times)
    out["jax_peak"] = max(v for k, v in out.items() if k.startswith("jax_"))
    out["torch_peak"] = max(v for k, v in out.items() if k.startswith("torch_"))
    return out


# ------------------------------------------------------------------------------------------- driver
def format_table(rows: list[dict]) -> str:
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    lines = ["tokens/s: median of the timed steps (best step in brackets); ratio, GFLOP/s and MFU from the "
             "medians; MFU2 = best step vs the best f32 matmul timed alongside it",
             f"{'seq x batch':>12} {'jax tok/s':>14} {'torch tok/s':>14} {'ratio':>6} {'jax GFLOP/s':>11} "
             f"{'MFU':>6} {'MFU2':>6} {'jax RSS MiB':>11} {'torch RSS MiB':>13} {'jax compile s':>13}"]
    for r in rows:
        torch_rss = r["torch"]["peak_rss_mib"] if "torch" in r else None
        jax_tps = f"{r['jax_tokens_per_s']:.0f} ({r['jax_tokens_per_s_best']:.0f})"
        torch_tps = (f"{r['torch_tokens_per_s']:.0f} ({r['torch_tokens_per_s_best']:.0f})"
                     if "torch" in r else "-")
        lines.append(
            f"{r['seq']:>6} x {r['batch']:<3} {jax_tps:>14} {torch_tps:>14} "
            f"{fmt(r.get('ratio_jax_over_torch'), '.2f'):>6} "
            f"{r['jax_model_flops_per_s'] / 1e9:>11.1f} {100 * r['jax_mfu_vs_jax_matmul_peak']:>5.1f}% "
            f"{100 * r['jax_mfu_vs_matmul_alongside']:>5.1f}% "
            f"{r['jax']['peak_rss_mib']:>11.0f} {fmt(torch_rss, '.0f'):>13} {r['jax']['compile_s']:>13.1f}")
    return "\n".join(lines)


def summarise(cfg, seq: int, batch: int, measured: dict, peak: dict) -> dict:
    tokens, fpt = seq * batch, flops_per_token(cfg, seq)
    row = {"seq": seq, "batch": batch, "flops_per_token": fpt}
    if "matmul" in measured:  # the f32 matmul rate measured alongside the jax steps
        m = measured.pop("matmul")
        row["matmul_alongside_flops"] = m["flops"] / m["step_min_s"]
        best_flops = fpt * tokens / measured["jax"]["step_min_s"]
        row["jax_mfu_vs_matmul_alongside"] = best_flops / row["matmul_alongside_flops"]
    for name, m in measured.items():
        row[name] = m
        row[f"{name}_tokens_per_s"] = tokens / m["step_s"]
        row[f"{name}_tokens_per_s_best"] = tokens / m["step_min_s"]
        row[f"{name}_model_flops_per_s"] = fpt * tokens / m["step_s"]
    row["jax_mfu_vs_jax_matmul_peak"] = row["jax_model_flops_per_s"] / peak["jax_peak"]
    if "torch" in measured:
        row["ratio_jax_over_torch"] = row["jax_tokens_per_s"] / row["torch_tokens_per_s"]
        row["ratio_jax_over_torch_best"] = row["jax_tokens_per_s_best"] / row["torch_tokens_per_s_best"]
    return row


def run_worker(kind: str, args, seq: int = 0, batch: int = 0) -> dict:
    vocab = [] if args.vocab is None else ["--vocab", str(args.vocab)]
    cmd = [sys.executable, __file__, *vocab, "--worker", kind, "--seq", str(seq), "--batch", str(batch),
           "--model", args.model, "--dtype", args.dtype, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--grad-accum", str(args.grad_accum),
           "--attention-block", str(args.attention_block), *(["--no-attention"] if args.no_attention else []),
           *(["--flat-matmul"] if args.flat_matmul else [])]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if args.xla_flags:
        env["XLA_FLAGS"] = args.xla_flags
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{kind} worker failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mini", choices=("tiny", "mini", "paper"))
    p.add_argument("--vocab", type=int, default=None, help="override the preset's vocabulary size")
    p.add_argument("--shapes", default="512x8,1024x8", help="comma-separated SEQxBATCH")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=6, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--attention-block", type=int, default=0, help="override the model config's attention_block")
    p.add_argument("--no-attention", action="store_true", help="ablation: attention = identity (jax only)")
    p.add_argument("--flat-matmul", action="store_true", help="2-D dots in the model (now the model's default; kept for older checkouts)")
    p.add_argument("--xla-flags", default=os.environ.get("XLA_FLAGS", ""), help="XLA_FLAGS for the jax worker")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--interleave", action="store_true",
                   help="time jax and torch in one process, alternating steps (a fair ratio on a shared "
                        "machine; peak RSS is then the sum)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        work = worker_matmul if args.worker == "matmul" else worker_steps
        print(json.dumps(work(args)))
        return {}

    cfg = model_config(args.model, args.vocab, args.dtype)
    peak = run_worker("matmul", args)
    rows = []
    for shape in args.shapes.split(","):
        seq, batch = (int(x) for x in shape.lower().split("x"))
        if args.interleave and not args.skip_torch:
            measured = run_worker("pair", args, seq, batch)
        else:
            measured = run_worker("jax", args, seq, batch)
            if not args.skip_torch:
                measured.update(run_worker("torch", args, seq, batch))
        rows.append(summarise(cfg, seq, batch, measured, peak))
    result = {"model": args.model, "vocab": cfg.vocab_size, "dtype": args.dtype, "params": cfg.num_params(),
              "matmul_peak_flops": peak, "xla_flags": args.xla_flags, "attention_block": args.attention_block,
              "no_attention": args.no_attention, "flat_matmul": args.flat_matmul,
              "grad_accum": args.grad_accum, "cpu_count": os.cpu_count(), "interleave": args.interleave,
              "steps": args.steps, "warmup": args.warmup, "rows": rows}
    print(f"model {args.model} ({cfg.num_params() / 1e6:.2f}M params, {args.dtype}); f32 matmul peak: "
          f"jax {peak['jax_peak'] / 1e9:.1f} GFLOP/s, torch {peak['torch_peak'] / 1e9:.1f} GFLOP/s")
    print(format_table(rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
