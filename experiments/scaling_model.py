"""FLOPs, memory per device and wall-time estimates of the paper preset from its configuration (a model, not
a measurement): the numbers of docs/scaling.md.

    python experiments/scaling_model.py [--mfu 0.4] [--mean-tokens 1436] [--out runs/scaling_model.json]

Training FLOPs per token = 6 N (N = non-embedding + output-head parameters) + 12 L d_attn c, with c the mean
causal context of a token (half the mean sequence length: no packing across sequences) and d_attn = heads x
head dim. Memory per device: f32 parameters, gradients and two Adam moments, sharded FSDP-style over the
devices, plus activations with one saved block input per layer (``remat``) for the device's share of the batch.
Decode: the KV cache per slot (bf16) and per-step weight and cache reads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: Dense bf16 peak FLOP/s and HBM bytes/s of the accelerators the paper preset is sized for (vendor figures).
DEVICES = {
    "H200 (1 GPU)": dict(chips=1, flops=989e12, hbm=141e9, bw=4.8e12),
    "H200 (8 GPUs)": dict(chips=8, flops=989e12, hbm=141e9, bw=4.8e12),
    "TPU v3-128 (64 chips)": dict(chips=64, flops=123e12, hbm=32e9, bw=0.9e12),
}


def estimate(mfu: float, mean_tokens: float) -> dict:
    from apr_jax import presets

    preset = presets.load("paper")
    m, t = preset.model, preset.train
    n = m.num_non_embedding_params() + m.vocab_size * m.hidden_size  # the output head's matmul counts too
    d_attn = m.num_heads * m.head_dim
    flops_token = 6 * n + 12 * m.num_layers * d_attn * (mean_tokens / 2)
    tokens = t.steps * t.batch_size * mean_tokens
    total = flops_token * tokens
    state_bytes = m.num_params() * 4 * 4  # params, grads, two Adam moments (f32)
    act_per_seq = m.num_layers * t.seq_len * m.hidden_size * 2 + t.seq_len * m.vocab_size * 4  # remat inputs + logits
    kv_slot = 2 * m.num_layers * m.num_kv_heads * m.max_seq_len * m.head_dim * 2
    weights_bf16 = m.num_params() * 2
    rows = []
    for name, dev in DEVICES.items():
        chips = dev["chips"]
        seconds = total / (chips * dev["flops"] * mfu)
        per_device = state_bytes / chips + act_per_seq * max(1, t.batch_size // chips)
        slots_fit = int((dev["hbm"] * 0.9 - weights_bf16) // kv_slot)
        # a decode step reads the weights once and, at full context, every slot's cache
        step_64 = (weights_bf16 + 64 * kv_slot) / dev["bw"]
        rows.append({"device": name, "sft_hours": round(seconds / 3600, 2),
                     "sft_memory_per_device_gb": round(per_device / 1e9, 1), "slots_that_fit_at_4k": slots_fit,
                     "decode_step_ms_64_slots_full_context": round(step_64 * 1e3, 2)})
    return {"model_params": m.num_params(), "non_embedding_params": m.num_non_embedding_params(),
            "steps": t.steps, "batch": t.batch_size, "mean_tokens_per_sequence": mean_tokens, "mfu": mfu,
            "train_flops_per_token": flops_token, "train_tokens": tokens, "train_flops": total,
            "kv_cache_per_slot_mb_bf16": round(kv_slot / 1e6, 1), "devices": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation")
    p.add_argument("--mean-tokens", type=float, default=1436, help="mean tokens per training sequence "
                   "(SoS+ demonstrations, digit tokens, measured by apr-jax data)")
    p.add_argument("--out")
    args = p.parse_args()
    r = estimate(args.mfu, args.mean_tokens)
    print(f"paper preset: {r['model_params'] / 1e6:.1f}M parameters, {r['train_tokens'] / 1e9:.2f}B training tokens, "
          f"{r['train_flops_per_token'] / 1e9:.2f} GFLOP/token, {r['train_flops'] / 1e18:.1f} EFLOP; KV cache "
          f"{r['kv_cache_per_slot_mb_bf16']:.0f} MB per 4K slot (bf16); MFU {args.mfu:.0%}")
    print(f"{'device':24} {'SFT hours':>9} {'GB/device':>9} {'4K slots':>8} {'decode ms (64 slots)':>21}")
    for row in r["devices"]:
        print(f"{row['device']:24} {row['sft_hours']:>9.2f} {row['sft_memory_per_device_gb']:>9.1f} "
              f"{row['slots_that_fit_at_4k']:>8} {row['decode_step_ms_64_slots_full_context']:>21.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(r, indent=1) + "\n")


if __name__ == "__main__":
    main()
