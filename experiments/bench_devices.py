"""SFT and decode throughput of the mini model on 1, 2 and 8 devices of one mesh (fake CPU devices here).

    python experiments/bench_devices.py --devices 1,2,8 --out runs/bench_devices.json

Each device count runs in its own process with ``--xla_force_host_platform_device_count=N`` and a
``(data=N, fsdp=1)`` mesh: SFT steps of ``--batch`` random sequences of ``--seq`` tokens (after a compiling
step), and the slot engine decoding ``--slots`` threads of ``--new-tokens`` tokens each with its slots split
over the mesh. Fake CPU devices share the same cores, so this shows that the sharded programs run and what
their partitioning costs, not a speedup; on accelerators the same commands measure scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args) -> dict:
    sys.path.insert(0, str(ROOT))
    import dataclasses

    import jax
    import numpy as np

    from apr_jax import presets
    from apr_jax.inference.engine import Engine
    from apr_jax.inference.sampling import thread_key
    from apr_jax.train import sft
    from apr_jax.train import sharding as sh
    from apr_jax.train.data import PadBatch

    preset = presets.load("mini")
    model = preset.model
    mesh = sh.make_mesh((-1, 1))
    cfg = dataclasses.replace(preset.train, batch_size=args.batch, seq_len=args.seq, steps=100, mesh=(-1, 1))
    fns = sft.compile_fns(model, cfg, cfg.steps, mesh)
    state = sft.init_state(fns, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    pad = PadBatch(args.seq, 0, "bucket", args.seq)
    batch = pad([np.concatenate([[1], rng.integers(4, 1000, args.seq - 2), [2]]) for _ in range(args.batch)])
    state, m = fns.step(state, sh.shard_batch(batch, mesh))
    jax.block_until_ready(m["loss"])
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, m = fns.step(state, sh.shard_batch(batch, mesh))
    jax.block_until_ready(m["loss"])
    sft_tps = args.steps * int(batch["loss_mask"].sum()) / (time.perf_counter() - t0)

    params = jax.device_get(state.params)

    def decode() -> float:
        engine = Engine(model, params, slots=args.slots, eos_id=-1, context=1024, mesh=mesh)
        for i in range(args.slots):
            engine.submit(i, [1] + rng.integers(4, 1000, 40).tolist(), args.new_tokens, thread_key(0, "b", str(i)))
        t = time.perf_counter()
        n = 0
        while not engine.idle:
            for f in engine.step():
                n += len(f.tokens)
                engine.release(f.key)
        return n / (time.perf_counter() - t)

    decode()  # compiles
    return {"devices": jax.device_count(), "sft_tokens_per_s": round(sft_tps, 1),
            "decode_tokens_per_s": round(decode(), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", default="1,2,8")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--out")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    rows = []
    for n in (int(x) for x in args.devices.split(",")):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
        cmd = [sys.executable, __file__, "--worker", "--batch", str(args.batch), "--seq", str(args.seq),
               "--steps", str(args.steps), "--slots", str(args.slots), "--new-tokens", str(args.new_tokens)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    base = rows[0]
    print(f"{'devices':>7} {'SFT tok/s':>10} {'ratio':>6} {'decode tok/s':>12} {'ratio':>6}")
    for r in rows:
        print(f"{r['devices']:>7} {r['sft_tokens_per_s']:>10.0f} {r['sft_tokens_per_s'] / base['sft_tokens_per_s']:>6.2f} "
              f"{r['decode_tokens_per_s']:>12.0f} {r['decode_tokens_per_s'] / base['decode_tokens_per_s']:>6.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "settings": vars(args)}, indent=1) + "\n")


if __name__ == "__main__":
    main()
