"""The CPU kernels of one decode step, alone, at 1 and more rows: what a step cannot go below on this host.

Usage::

    python experiments/bench_kernels.py                       # mini model, 1/2/4/10/16 rows, 156 cached keys
    python experiments/bench_kernels.py --rows 1,10 --keys 156 --out runs/bench_kernels.json

For each row count R, with the preset's model (random weights; only the shapes matter):

* ``projections``: every projection of one decode step (per layer q/k/v, o, gate/up and down, then the LM
  head) through :func:`apr_jax.model.cpu_kernels.packed_matmul`, against weights packed as the engine packs
  them: milliseconds per step and GFLOP/s (2 x R x the weights' multiply-adds).
* ``attention``: :func:`apr_jax.model.cpu_kernels.decode_attention` over every layer of a fp32 KV cache whose
  R rows each hold ``--keys`` keys (the batching benchmark's mean: a 28-token prompt plus 256 generated tokens
  gives 156 on average): milliseconds per step, nanoseconds per key and head, and the GB/s of keys and values
  read.

Each figure is the median over ``--repeats`` timings of ``--steps`` steps in one jitted loop (one dispatch),
so the host overhead of dispatching is excluded. ``kernel ratio`` is R rows' projections plus attention over
one row's: the part of the batching ratio of ``bench_decode.py`` that the kernels alone set (docs/inference.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mini", help="preset whose model shapes are used")
    p.add_argument("--rows", default="1,2,4,10,16", help="rows (threads) per step, comma-separated")
    p.add_argument("--keys", type=int, default=156, help="cached keys per row")
    p.add_argument("--steps", type=int, default=200, help="steps per timing")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", help="write the results as JSON")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from apr_jax import presets
    from apr_jax.model import cpu_kernels

    if not (cpu_kernels.available() and jax.default_backend() == "cpu"):
        raise SystemExit("the CPU kernels are not available here (see the log), so there is nothing to measure")
    cfg = presets.load(args.model).model
    d, f, n, k, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    shapes = [(d, (n + 2 * k) * h), (n * h, d), (d, 2 * f), (f, d)] * cfg.num_layers + [(d, cfg.vocab_size)]
    rng = np.random.default_rng(0)
    weights = [cpu_kernels.pack(jnp.asarray(rng.normal(0, 0.02, s), jnp.float32)) for s in shapes]
    macs = sum(a * b for a, b in shapes)

    def timed(fn, *operands) -> float:
        jax.block_until_ready(fn(*operands))
        walls = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*operands))
            walls.append((time.perf_counter() - t0) / args.steps)
        return sorted(walls)[len(walls) // 2]

    @jax.jit
    def projections(x_RD, weights):
        def step(i, acc_R):
            total = acc_R
            for (depth, cols), w in zip(shapes, weights):
                x = jnp.broadcast_to(x_RD[:, :1], (x_RD.shape[0], depth)) + i.astype(jnp.float32)
                total = total + cpu_kernels.packed_matmul(x, w, cols)[:, 0]
            return total
        return jax.lax.fori_loop(0, args.steps, step, jnp.zeros(x_RD.shape[0], jnp.float32))

    @jax.jit
    def attention(q_RNH, k_cache, v_cache, limit_R):
        def step(i, acc_RNH):
            q = q_RNH + i.astype(jnp.float32) * 1e-6
            for layer in range(cfg.num_layers):
                acc_RNH = acc_RNH + cpu_kernels.decode_attention(q, k_cache, v_cache, layer, limit_R, h**-0.5)
            return acc_RNH
        return jax.lax.fori_loop(0, args.steps, step, jnp.zeros_like(q_RNH))

    results = []
    for rows in [int(r) for r in args.rows.split(",")]:
        x = jnp.asarray(rng.normal(0, 1, (rows, d)), jnp.float32)
        proj_s = timed(projections, x, weights)
        cache_shape = (cfg.num_layers, rows, k, args.keys, h)
        k_cache = jnp.asarray(rng.normal(0, 1, cache_shape), jnp.float32)
        v_cache = jnp.asarray(rng.normal(0, 1, cache_shape), jnp.float32)
        q = jnp.asarray(rng.normal(0, 1, (rows, n, h)), jnp.float32)
        attn_s = timed(attention, q, k_cache, v_cache, jnp.full((rows,), args.keys, jnp.int32))
        key_heads = rows * cfg.num_layers * k * args.keys
        results.append({
            "rows": rows, "projections_ms": proj_s * 1e3, "projections_gflops": 2 * rows * macs / proj_s / 1e9,
            "attention_ms": attn_s * 1e3, "attention_ns_per_key_head": attn_s / key_heads * 1e9,
            "attention_gb_per_s": key_heads * 2 * h * 4 / attn_s / 1e9})
    base = results[0]
    for r in results:
        r["kernel_ratio"] = (r["projections_ms"] + r["attention_ms"]) / (base["projections_ms"] + base["attention_ms"])
        print(f"{r['rows']:3d} rows: projections {r['projections_ms']:.3f} ms/step ({r['projections_gflops']:.0f} "
              f"GFLOP/s) | attention over {args.keys} keys {r['attention_ms']:.3f} ms/step "
              f"({r['attention_ns_per_key_head']:.2f} ns per key and head, {r['attention_gb_per_s']:.0f} GB/s) | "
              f"kernel ratio vs {base['rows']} row(s) {r['kernel_ratio']:.2f}x", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"model": args.model, "keys": args.keys, "weights_mib":
                                              4 * macs / 2**20, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
