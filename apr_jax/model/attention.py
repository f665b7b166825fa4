"""Exact blockwise ("flash") attention for CPU and accelerators, with grouped KV heads.

Online softmax in a ``lax.scan`` over (query block, key block) pairs, with a FlashAttention-2 custom VJP
that recomputes each block's probabilities from the saved log-sum-exp, so no more than one
``cfg.attention_block``-sized block of scores exists at a time, forward or backward; key blocks after a
query block are skipped (:func:`attention`, training and full forwards). Inference over a KV cache uses
:func:`cached_attention`, which reads key blocks straight out of the stacked cache and visits only the blocks
that hold valid keys. Measurements against ``jax.nn.dot_product_attention``: docs/model.md.

Shape suffixes: L layers, B batch, T queries (Q: one query block), S key slots (C: one key block), N query
heads, K kv heads, G = N // K, H head dim.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from apr_jax.model import cpu_kernels
from apr_jax.model import kv_cache as kvc
from apr_jax.model.config import LlamaConfig

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def compute_dtype(cfg: LlamaConfig):
    return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


def matmul(cfg: LlamaConfig, subscripts: str, x, w) -> jax.Array:
    """einsum in the compute dtype with fp32 accumulation and an fp32 result.

    Projections ``BT<c>,<c><o>->BT<o>`` run as one 2-D ``[B*T, prod(c)] @ [prod(c), prod(o)]`` dot: the same
    values, but XLA:CPU otherwise transposes operands in the backward pass and runs these dots about 2x
    slower (measured: MLP forward+backward 2x, whole SFT step 1.1-1.2x faster; docs/training.md).
    """
    dtype = compute_dtype(cfg)
    lhs, rest = subscripts.split(",")
    rhs, out = rest.split("->")
    contract = lhs[2:]
    if lhs[:2] == "BT" and out[:2] == "BT" and rhs == contract + out[2:]:
        k = math.prod(x.shape[2:])
        y = jnp.dot(x.reshape(-1, k).astype(dtype), w.reshape(k, -1).astype(dtype),
                    preferred_element_type=jnp.float32)
        return y.reshape(*x.shape[:2], *w.shape[len(contract):])
    return jnp.einsum(subscripts, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


class MaskSpec(NamedTuple):
    """What each query may attend to, kept as 1-D descriptors so masks are built one block at a time.

    Key slot ``s`` is visible to query ``t`` of row ``b`` iff ``s <= q_slot_BT[b, t]`` (causal),
    ``s < k_limit_B[b]`` (valid) and ``q_seg_BT[b, t] == k_seg_BS[b, s]`` (same packed segment).
    A query that sees no key gets a zero output.
    """

    q_slot_BT: jax.Array
    q_seg_BT: jax.Array
    k_seg_BS: jax.Array
    k_limit_B: jax.Array


class _Blocks(NamedTuple):
    """Static tiling: query block ``bq``, key block ``bk`` and the visited (query, key) block pairs."""

    bq: int
    bk: int
    pairs: tuple[tuple[int, int], ...]  # query-block major, key blocks ascending from 0


def _block_inputs(cfg, blocks, q_BKGTH, k_BKSH, v_BKSH, spec, i, j):
    """Slices of query block ``i`` and key block ``j``, their fp32 scores and visibility mask."""
    bq, bk = blocks.bq, blocks.bk
    q_BKGQH = jax.lax.dynamic_slice_in_dim(q_BKGTH, i * bq, bq, axis=3)
    k_BKCH = jax.lax.dynamic_slice_in_dim(k_BKSH, j * bk, bk, axis=2)
    v_BKCH = jax.lax.dynamic_slice_in_dim(v_BKSH, j * bk, bk, axis=2)
    q_slot_BQ = jax.lax.dynamic_slice_in_dim(spec.q_slot_BT, i * bq, bq, axis=1)
    q_seg_BQ = jax.lax.dynamic_slice_in_dim(spec.q_seg_BT, i * bq, bq, axis=1)
    k_seg_BC = jax.lax.dynamic_slice_in_dim(spec.k_seg_BS, j * bk, bk, axis=1)
    k_slot_C = j * bk + jnp.arange(bk)
    mask_BQC = (
        (k_slot_C[None, None, :] <= q_slot_BQ[:, :, None])
        & (k_slot_C[None, None, :] < spec.k_limit_B[:, None, None])
        & (q_seg_BQ[:, :, None] == k_seg_BC[:, None, :])
    )
    scale = q_BKGTH.shape[-1] ** -0.5
    scores_BKGQC = matmul(cfg, "BKGQH,BKCH->BKGQC", q_BKGQH, k_BKCH) * scale
    return q_BKGQH, k_BKCH, v_BKCH, scores_BKGQC, mask_BQC[:, None, None]


def _online_softmax(cfg, m_BKGQ, l_BKGQ, acc_BKGQH, scores_BKGQC, mask, v_BKCH):
    """One key block of the online softmax: new running max, normaliser and unnormalised output."""
    scores_BKGQC = jnp.where(mask, scores_BKGQC, _MASK_VALUE)
    m_new_BKGQ = jnp.maximum(m_BKGQ, scores_BKGQC.max(axis=-1))
    p_BKGQC = jnp.where(mask, jnp.exp(scores_BKGQC - m_new_BKGQ[..., None]), 0.0)
    correction_BKGQ = jnp.exp(m_BKGQ - m_new_BKGQ)
    l_BKGQ = l_BKGQ * correction_BKGQ + p_BKGQC.sum(axis=-1)
    pv_BKGQH = matmul(cfg, "BKGQC,BKCH->BKGQH", p_BKGQC, v_BKCH)
    return m_new_BKGQ, l_BKGQ, acc_BKGQH * correction_BKGQ[..., None] + pv_BKGQH


def _flash_forward(cfg, blocks, q_BKGTH, k_BKSH, v_BKSH, spec):
    """Online-softmax attention over the block pairs; returns the output and the log-sum-exp."""
    b, kh, g, t, h = q_BKGTH.shape
    bq = blocks.bq

    def step(carry, ij):
        m_BKGQ, l_BKGQ, acc_BKGQH, out_BKGTH, lse_BKGT = carry
        i, j = ij[0], ij[1]
        fresh = j == 0  # first key block of a new query block
        m_BKGQ = jnp.where(fresh, _MASK_VALUE, m_BKGQ)
        l_BKGQ = jnp.where(fresh, 0.0, l_BKGQ)
        acc_BKGQH = jnp.where(fresh, 0.0, acc_BKGQH)
        _, _, v_BKCH, scores_BKGQC, mask = _block_inputs(cfg, blocks, q_BKGTH, k_BKSH, v_BKSH, spec, i, j)
        m_new_BKGQ, l_BKGQ, acc_BKGQH = _online_softmax(cfg, m_BKGQ, l_BKGQ, acc_BKGQH, scores_BKGQC, mask, v_BKCH)
        # Rewritten at every key block; the last write of a query block is the final value.
        out_BKGQH = acc_BKGQH / jnp.maximum(l_BKGQ, 1e-30)[..., None]
        lse_BKGQ = jnp.where(l_BKGQ > 0, m_new_BKGQ + jnp.log(jnp.maximum(l_BKGQ, 1e-30)), 0.0)
        out_BKGTH = jax.lax.dynamic_update_slice_in_dim(out_BKGTH, out_BKGQH, i * bq, axis=3)
        lse_BKGT = jax.lax.dynamic_update_slice_in_dim(lse_BKGT, lse_BKGQ, i * bq, axis=3)
        return (m_new_BKGQ, l_BKGQ, acc_BKGQH, out_BKGTH, lse_BKGT), None

    init = (
        jnp.full((b, kh, g, bq), _MASK_VALUE),
        jnp.zeros((b, kh, g, bq)),
        jnp.zeros((b, kh, g, bq, h)),
        jnp.zeros((b, kh, g, t, h)),
        jnp.zeros((b, kh, g, t)),
    )
    carry, _ = jax.lax.scan(step, init, jnp.asarray(blocks.pairs, jnp.int32))
    return carry[3], carry[4]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(cfg, blocks, q_BKGTH, k_BKSH, v_BKSH, spec):
    return _flash_forward(cfg, blocks, q_BKGTH, k_BKSH, v_BKSH, spec)[0]


def _flash_fwd(cfg, blocks, q_BKGTH, k_BKSH, v_BKSH, spec):
    out_BKGTH, lse_BKGT = _flash_forward(cfg, blocks, q_BKGTH, k_BKSH, v_BKSH, spec)
    return out_BKGTH, (q_BKGTH, k_BKSH, v_BKSH, spec, out_BKGTH, lse_BKGT)


def _flash_bwd(cfg, blocks, residuals, dout_BKGTH):
    """FlashAttention-2 backward: recompute each block's probabilities from the saved log-sum-exp."""
    q_BKGTH, k_BKSH, v_BKSH, spec, out_BKGTH, lse_BKGT = residuals
    bq, bk = blocks.bq, blocks.bk
    delta_BKGT = jnp.sum(dout_BKGTH * out_BKGTH, axis=-1)
    scale = q_BKGTH.shape[-1] ** -0.5

    def step(carry, ij):
        dq_BKGTH, dk_BKSH, dv_BKSH = carry
        i, j = ij[0], ij[1]
        q_BKGQH, k_BKCH, v_BKCH, scores_BKGQC, mask = _block_inputs(
            cfg, blocks, q_BKGTH, k_BKSH, v_BKSH, spec, i, j
        )
        lse_BKGQ = jax.lax.dynamic_slice_in_dim(lse_BKGT, i * bq, bq, axis=3)
        delta_BKGQ = jax.lax.dynamic_slice_in_dim(delta_BKGT, i * bq, bq, axis=3)
        dout_BKGQH = jax.lax.dynamic_slice_in_dim(dout_BKGTH, i * bq, bq, axis=3)
        p_BKGQC = jnp.where(mask, jnp.exp(scores_BKGQC - lse_BKGQ[..., None]), 0.0)
        dp_BKGQC = matmul(cfg, "BKGQH,BKCH->BKGQC", dout_BKGQH, v_BKCH)
        ds_BKGQC = p_BKGQC * (dp_BKGQC - delta_BKGQ[..., None]) * scale
        dq_BKGQH = matmul(cfg, "BKGQC,BKCH->BKGQH", ds_BKGQC, k_BKCH)
        dk_BKCH = matmul(cfg, "BKGQC,BKGQH->BKCH", ds_BKGQC, q_BKGQH)
        dv_BKCH = matmul(cfg, "BKGQC,BKGQH->BKCH", p_BKGQC, dout_BKGQH)

        def add(total, part, start, axis):
            current = jax.lax.dynamic_slice_in_dim(total, start, part.shape[axis], axis=axis)
            return jax.lax.dynamic_update_slice_in_dim(total, current + part, start, axis=axis)

        return (
            add(dq_BKGTH, dq_BKGQH, i * bq, 3),
            add(dk_BKSH, dk_BKCH, j * bk, 2),
            add(dv_BKSH, dv_BKCH, j * bk, 2),
        ), None

    init = (jnp.zeros_like(q_BKGTH), jnp.zeros_like(k_BKSH), jnp.zeros_like(v_BKSH))
    (dq, dk, dv), _ = jax.lax.scan(step, init, jnp.asarray(blocks.pairs, jnp.int32))
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(scale, q_BKGTH, k_BKSH, v_BKSH, spec):
    """The fused CPU kernel (:func:`cpu_kernels.train_attention`): same maths as :func:`_flash`."""
    return cpu_kernels.train_attention(q_BKGTH, k_BKSH, v_BKSH, spec, scale)[0]


def _fused_fwd(scale, q_BKGTH, k_BKSH, v_BKSH, spec):
    out_BKGTH, lse_BKGT = cpu_kernels.train_attention(q_BKGTH, k_BKSH, v_BKSH, spec, scale)
    return out_BKGTH, (q_BKGTH, k_BKSH, v_BKSH, spec, out_BKGTH, lse_BKGT)


def _fused_bwd(scale, residuals, dout_BKGTH):
    q_BKGTH, k_BKSH, v_BKSH, spec, out_BKGTH, lse_BKGT = residuals
    dq, dk, dv = cpu_kernels.train_attention_grad(q_BKGTH, k_BKSH, v_BKSH, out_BKGTH, lse_BKGT, dout_BKGTH, spec,
                                                  scale)
    return dq, dk, dv, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def attention(cfg: LlamaConfig, q_BTNH, k_BTKH, v_BTKH, spec: MaskSpec) -> jax.Array:
    """Exact blockwise (flash) causal self-attention with GQA over a whole sequence (no cache).

    Query ``t`` sits at key slot ``t``, so key blocks after a query block are skipped; never builds more
    than one ``cfg.attention_block``-sized block of scores. Differentiable (FlashAttention-2 backward).
    """
    b, t, n, h = q_BTNH.shape
    bq = min(t, cfg.attention_block)
    nq = -(-t // bq)
    pairs = tuple((i, j) for i in range(nq) for j in range(i + 1))
    blocks = _Blocks(bq, bq, pairs)

    pad_t = nq * bq - t
    spec = MaskSpec(
        jnp.pad(spec.q_slot_BT, ((0, 0), (0, pad_t)), constant_values=-1),
        jnp.pad(spec.q_seg_BT, ((0, 0), (0, pad_t))),
        jnp.pad(spec.k_seg_BS, ((0, 0), (0, pad_t))),
        jnp.minimum(spec.k_limit_B, t),
    )
    q_BTKGH = jnp.pad(q_BTNH, ((0, 0), (0, pad_t), (0, 0), (0, 0))).reshape(
        b, nq * bq, cfg.num_kv_heads, cfg.num_groups, h
    )
    q_BKGTH = q_BTKGH.transpose(0, 2, 3, 1, 4)
    k_BKSH = jnp.pad(k_BTKH, ((0, 0), (0, pad_t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    v_BKSH = jnp.pad(v_BTKH, ((0, 0), (0, pad_t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    if cfg.dtype != "bfloat16" and q_BKGTH.dtype == k_BKSH.dtype == v_BKSH.dtype == jnp.float32 and \
            cpu_kernels.available():
        # On CPU: the fused kernel (forward and backward); other platforms keep the blockwise XLA path.
        out_BKGTH = jax.lax.platform_dependent(
            q_BKGTH, k_BKSH, v_BKSH, spec, cpu=functools.partial(_fused, h**-0.5),
            default=functools.partial(_flash, cfg, blocks))
    else:
        out_BKGTH = _flash(cfg, blocks, q_BKGTH, k_BKSH, v_BKSH, spec)
    return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(b, nq * bq, n, h)[:, :t]


# Keys per block when a handful of queries (decode) reads the cache (measured: docs/inference.md).
DECODE_KEY_BLOCK = 128


def cached_attention(cfg: LlamaConfig, q_BTNH, k_LBKSH, v_LBKSH, layer, spec: MaskSpec) -> jax.Array:
    """Attention of new queries over one layer of a KV cache, read in place (inference only).

    ``k_LBKSH`` / ``v_LBKSH`` are the whole stacked cache (all layers, new keys already written) and
    ``layer`` the (traced) layer index: key blocks are sliced straight out of it, so a decode step never
    copies, pads or transposes the whole cache. Key blocks run in a ``fori_loop`` whose trip count is
    traced: only the blocks below the longest row's valid length are read, so a step costs what the rows
    hold, not what the cache could hold. Queries go in blocks of ``cfg.attention_block`` (``lax.map``).
    Not reverse-differentiable (the trip count is dynamic); training uses :func:`attention`.
    """
    b, t, n, h = q_BTNH.shape
    s = k_LBKSH.shape[3]
    if (t == 1 and q_BTNH.dtype == jnp.float32 and k_LBKSH.dtype == v_LBKSH.dtype
            and k_LBKSH.dtype in cpu_kernels.CACHE_DTYPES and cpu_kernels.available()):
        # One new query per row (a decode step): on CPU, the fused kernel (one sweep per row and kv head)
        # instead of rows x heads tiny dots; other platforms keep the XLA path below. A cache never packs
        # segments, so visibility is the causal/valid limit alone.
        limit_B = jnp.clip(jnp.minimum(spec.q_slot_BT[:, 0] + 1, spec.k_limit_B), 0, s)

        def fused(q_BTNH, k_LBKSH, v_LBKSH, layer, limit_B):
            return cpu_kernels.decode_attention(q_BTNH[:, 0], k_LBKSH, v_LBKSH, layer, limit_B, h**-0.5)[:, None]

        def portable(q_BTNH, k_LBKSH, v_LBKSH, layer, limit_B):
            return _cached_attention_xla(cfg, q_BTNH, k_LBKSH, v_LBKSH, layer, spec)

        return jax.lax.platform_dependent(q_BTNH, k_LBKSH, v_LBKSH, layer, limit_B, cpu=fused, default=portable)
    return _cached_attention_xla(cfg, q_BTNH, k_LBKSH, v_LBKSH, layer, spec)


def _cached_attention_xla(cfg: LlamaConfig, q_BTNH, k_LBKSH, v_LBKSH, layer, spec: MaskSpec) -> jax.Array:
    """:func:`cached_attention` in XLA ops: blocked online softmax over the valid key blocks."""
    b, t, n, h = q_BTNH.shape
    s = k_LBKSH.shape[3]
    kh, g = cfg.num_kv_heads, cfg.num_groups
    bq = min(t, cfg.attention_block)
    nq = -(-t // bq)
    bk = min(s, cfg.attention_block if bq > 8 else DECODE_KEY_BLOCK)
    pad_t = nq * bq - t
    scale = h**-0.5

    def per_block(x_BT, fill):  # [B, T] -> [nq, B, bq]
        return jnp.pad(x_BT, ((0, 0), (0, pad_t)), constant_values=fill).reshape(b, nq, bq).swapaxes(0, 1)

    q_nBQKGH = jnp.pad(q_BTNH, ((0, 0), (0, pad_t), (0, 0), (0, 0))).reshape(b, nq, bq, kh, g, h).swapaxes(0, 1)
    q_slot_nBQ, q_seg_nBQ = per_block(spec.q_slot_BT, -1), per_block(spec.q_seg_BT, 0)
    k_limit_B = jnp.minimum(spec.k_limit_B, s)
    num_key_blocks = (jnp.max(k_limit_B) + bk - 1) // bk

    def query_block(args):
        q_BQKGH, q_slot_BQ, q_seg_BQ = args
        q_BKGQH = q_BQKGH.transpose(0, 2, 3, 1, 4)

        def key_block(j, carry):
            m_BKGQ, l_BKGQ, acc_BKGQH = carry
            lo = j * bk
            start = jnp.minimum(lo, s - bk)  # the last block may overlap the previous one; masked below
            k_BKCH = kvc.entries(jax.lax.dynamic_slice(k_LBKSH, (layer, 0, 0, start, 0), (1, b, kh, bk, h))[0])
            v_BKCH = kvc.entries(jax.lax.dynamic_slice(v_LBKSH, (layer, 0, 0, start, 0), (1, b, kh, bk, h))[0])
            k_seg_BC = jax.lax.dynamic_slice_in_dim(spec.k_seg_BS, start, bk, axis=1)
            k_slot_C = start + jnp.arange(bk)
            mask_BQC = (
                (k_slot_C[None, None, :] >= lo)
                & (k_slot_C[None, None, :] <= q_slot_BQ[:, :, None])
                & (k_slot_C[None, None, :] < k_limit_B[:, None, None])
                & (q_seg_BQ[:, :, None] == k_seg_BC[:, None, :])
            )[:, None, None]
            scores_BKGQC = matmul(cfg, "BKGQH,BKCH->BKGQC", q_BKGQH, k_BKCH) * scale
            return _online_softmax(cfg, m_BKGQ, l_BKGQ, acc_BKGQH, scores_BKGQC, mask_BQC, v_BKCH)

        init = (jnp.full((b, kh, g, bq), _MASK_VALUE), jnp.zeros((b, kh, g, bq)), jnp.zeros((b, kh, g, bq, h)))
        _, l_BKGQ, acc_BKGQH = jax.lax.fori_loop(0, num_key_blocks, key_block, init)
        out_BKGQH = acc_BKGQH / jnp.maximum(l_BKGQ, 1e-30)[..., None]
        return out_BKGQH.transpose(0, 3, 1, 2, 4)  # [B, Q, K, G, H]

    out_nBQKGH = jax.lax.map(query_block, (q_nBQKGH, q_slot_nBQ, q_seg_nBQ))
    return out_nBQKGH.swapaxes(0, 1).reshape(b, nq * bq, n, h)[:, :t]
