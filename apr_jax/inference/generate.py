"""Plain batched greedy generation with a KV cache: ragged prefill, then one jitted decode loop.

This is the simple decoder the SFT stage uses for its first accuracy figures. Rows stop at EOS or after
``max_new_tokens``; the loop returns to the host once, when every row has stopped.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from apr_jax.model import forward, init_cache
from apr_jax.model.config import LlamaConfig


def _bucket(n: int, quantum: int) -> int:
    return max(quantum, -(-n // quantum) * quantum)


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len"))
def _generate(cfg: LlamaConfig, params, tokens_BP, lengths_B, max_new_B, cache_len: int, eos_id):
    """``max_new_B`` is a traced scalar: the output buffer is ``cache_len - prompt_len`` wide, so shapes (and
    compilations) depend only on the prompt bucket and the cache length, never on the token budget."""
    batch, prompt_len = tokens_BP.shape
    max_new_tokens = cache_len - prompt_len
    cache = init_cache(cfg, batch, cache_len)
    positions_BP = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), (batch, prompt_len))
    logits_BPV, cache = forward(cfg, params, tokens_BP, positions_BP, cache, valid_lengths=lengths_B)
    last_BV = jnp.take_along_axis(logits_BPV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    first_B = jnp.argmax(last_BV, axis=-1).astype(jnp.int32)
    out_BN = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(first_B)
    done_B = first_B == eos_id

    def cond(state):
        step, _, _, done_B, _ = state
        return (step < max_new_B) & ~jnp.all(done_B)

    def body(state):
        step, cache, token_B, done_B, out_BN = state
        positions_B1 = cache.lengths[:, None]
        logits_B1V, cache = forward(cfg, params, token_B[:, None], positions_B1, cache)
        nxt_B = jnp.argmax(logits_B1V[:, 0], axis=-1).astype(jnp.int32)
        nxt_B = jnp.where(done_B, eos_id, nxt_B)
        out_BN = out_BN.at[:, step].set(nxt_B)
        return step + 1, cache, nxt_B, done_B | (nxt_B == eos_id), out_BN

    state = (jnp.int32(1), cache, first_B, done_B, out_BN)
    _, _, _, _, out_BN = jax.lax.while_loop(cond, body, state)
    return out_BN


def greedy_generate(cfg: LlamaConfig, params, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_id: int,
                    pad_id: int = 0, batch_size: int = 32, quantum: int = 64) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (token ids, BOS included), each up to ``max_new_tokens`` and
    ending with ``eos_id`` when the model wrote it. Prompt lengths are padded to multiples of ``quantum``
    and the batch to ``batch_size``, so shapes (and compilations) come from a small set."""
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[start:start + batch_size]]
        if any(len(p) == 0 for p in chunk):
            raise ValueError("every prompt needs at least one token (BOS)")
        longest = max(len(p) for p in chunk)
        prompt_len = _bucket(longest, quantum)
        cache_len = max(cfg.max_seq_len, prompt_len + quantum)
        new = min(max_new_tokens, cache_len - longest)
        if new <= 0:
            raise ValueError(f"prompt of {longest} tokens leaves no room in a {cfg.max_seq_len}-token context")
        rows = len(chunk)
        tokens = np.full((batch_size, prompt_len), pad_id, np.int32)
        lengths = np.ones(batch_size, np.int32)
        for i, p in enumerate(chunk):
            tokens[i, :len(p)] = p
            lengths[i] = len(p)
        gen = np.asarray(_generate(cfg, params, jnp.asarray(tokens), jnp.asarray(lengths), jnp.int32(new),
                                   cache_len, jnp.int32(eos_id)))[:, :new]
        for i in range(rows):
            row = gen[i].tolist()
            out.append(row[:row.index(eos_id) + 1] if eos_id in row else row)
    return out
