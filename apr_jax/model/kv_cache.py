"""A static-shape key/value cache with one length per row.

Layout: ``k`` and ``v`` are ``[layers, batch, kv_heads, max_len, head_dim]`` and ``lengths[batch]`` counts
the valid positions of each row (slots ``0 .. lengths[b] - 1``). Slots at or beyond a row's length hold
stale data that attention masks out, so rolling a row back (:func:`truncate`) or clearing it (:func:`reset`)
only changes ``lengths``. Every operation keeps the shapes, so nothing recompiles as rows grow or shrink.

The forward pass (:func:`apr_jax.model.llama.forward` with ``cache=``) appends each row's new tokens at the
row's own length (:func:`write`) and advances ``lengths`` by the number of valid new tokens of the row.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from apr_jax.model.config import LlamaConfig


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for a batch of rows (a pytree; all fields are arrays).

    Attributes:
      k: keys, ``[layers, batch, kv_heads, max_len, head_dim]`` (after RoPE). Heads before slots: a block of
        key slots of one row is what attention's batched dots consume without a transpose.
      v: values, same shape as ``k``.
      lengths: ``[batch]`` int32, the number of valid positions of each row.
    """

    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


# A bfloat16 cache is stored as the uint16 bit patterns of its entries: XLA:CPU widens a bf16 scatter's
# whole operand (the stacked cache) to fp32 and back at every decode step, and a bitcast around it is
# materialised as copies too, while a uint16 scatter writes in place. :func:`entries` views them as bf16.
BF16_BITS = jnp.uint16


def storage_dtype(dtype) -> jnp.dtype:
    """The array dtype that holds cache entries of ``dtype`` (float32 as is, bfloat16 as uint16 bits)."""
    dtype = jnp.dtype(dtype)
    if dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(BF16_BITS)):
        return jnp.dtype(BF16_BITS)
    if dtype != jnp.dtype(jnp.float32):
        raise ValueError(f"a KV cache holds float32 or bfloat16 entries, got {dtype}")
    return dtype


def entries(x: jax.Array) -> jax.Array:
    """A cache array (or a slice of one) as numbers: float32 as is, uint16 bits as bfloat16."""
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == BF16_BITS else x


def stored(x: jax.Array, storage) -> jax.Array:
    """Numbers as a cache of ``storage`` dtype holds them (the inverse of :func:`entries`, rounding to bf16)."""
    if storage == BF16_BITS:
        return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), BF16_BITS)
    return x.astype(storage)


def init_cache(cfg: LlamaConfig, batch: int, max_len: int | None = None, dtype=jnp.float32) -> KVCache:
    """An empty cache (all lengths 0) of ``batch`` rows of ``max_len`` slots (default ``cfg.max_seq_len``).

    ``dtype``: float32 (exact), or bfloat16 (entries rounded to bf16: half the memory and memory traffic;
    stored as uint16 bits, see :data:`BF16_BITS`).
    """
    max_len = cfg.max_seq_len if max_len is None else max_len
    dtype = storage_dtype(dtype)
    if batch <= 0 or max_len <= 0:
        raise ValueError(f"init_cache needs batch > 0 and max_len > 0, got batch={batch}, max_len={max_len}")
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), lengths=jnp.zeros((batch,), jnp.int32)
    )


def write(
    cache_LBKSH: jax.Array, layer, new_BTKH: jax.Array, lengths_B: jax.Array, num_new_B: jax.Array
) -> jax.Array:
    """Write the first ``num_new_B[b]`` of ``new_BTKH[b]`` at slots ``lengths_B[b] ...`` of ``layer``.

    ``cache_LBKSH`` is the whole stacked cache and ``layer`` a (traced) layer index: the scatter touches only
    the new entries, so inside a loop XLA updates the cache in place. Padding tokens (index
    ``>= num_new_B[b]``) and slots past the end of the cache are dropped, never clamped onto valid entries.
    """
    batch, heads, max_len = cache_LBKSH.shape[1:4]
    steps_T = jnp.arange(new_BTKH.shape[1])
    slots_BT = lengths_B[:, None] + steps_T[None, :]
    slots_BT = jnp.where(steps_T[None, :] < num_new_B[:, None], slots_BT, max_len)  # out of range: dropped
    rows_B11 = jnp.arange(batch)[:, None, None]
    heads_1K1 = jnp.arange(heads)[None, :, None]
    new_BKTH = stored(new_BTKH.swapaxes(1, 2), cache_LBKSH.dtype)
    return cache_LBKSH.at[layer, rows_B11, heads_1K1, slots_BT[:, None, :]].set(new_BKTH, mode="drop")


def _row_mask(cache: KVCache, rows) -> jax.Array:
    """``[batch]`` bool from a boolean row mask, a row index or an array of row indices."""
    rows = jnp.asarray(rows)
    if rows.dtype == jnp.bool_:
        if rows.shape != (cache.batch_size,):
            raise ValueError(f"row mask must have shape ({cache.batch_size},), got {rows.shape}")
        return rows
    if not jnp.issubdtype(rows.dtype, jnp.integer):
        raise TypeError(f"rows must be a bool mask or integer row indices, got dtype {rows.dtype}")
    return jnp.zeros((cache.batch_size,), jnp.bool_).at[rows].set(True)


def truncate(cache: KVCache, rows, new_length) -> KVCache:
    """Roll the selected rows back to their first ``new_length`` positions.

    Args:
      cache: the cache.
      rows: a ``[batch]`` bool mask, a row index, or an int array of row indices.
      new_length: scalar or ``[batch]`` int; a row is never extended (its length becomes
        ``min(length, new_length)``).
    """
    mask_B = _row_mask(cache, rows)
    new_B = jnp.broadcast_to(jnp.asarray(new_length, jnp.int32), cache.lengths.shape)
    lengths = jnp.where(mask_B, jnp.minimum(cache.lengths, jnp.maximum(new_B, 0)), cache.lengths)
    return cache.replace(lengths=lengths)


def reset(cache: KVCache, rows) -> KVCache:
    """Empty the selected rows (``rows`` as in :func:`truncate`)."""
    return truncate(cache, rows, 0)
