"""A Llama-2 decoder in Flax Linen, exposed as two pure functions: :func:`init` and :func:`forward`.

Architecture: token embedding, ``num_layers`` pre-norm blocks (RMSNorm -> attention with RoPE and optional
grouped KV heads -> residual; RMSNorm -> SwiGLU MLP -> residual), a final RMSNorm and an untied output
head. No biases; every matrix is initialised from normal(``init_std``). RoPE follows the Hugging Face
``rotate_half`` convention so the weights load into ``transformers.LlamaForCausalLM`` unchanged.

Shape suffixes: B batch, T new tokens (Q: one query block), S key slots (C: one key block), D hidden,
N query heads, K kv heads, G = N // K, H head dim, F MLP width, V vocabulary.

Attention is exact blockwise "flash" attention (:mod:`apr_jax.model.attention`): no more than one
``cfg.attention_block``-sized block of scores exists at a time, forward or backward.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from apr_jax.model import kv_cache as kvc
from apr_jax.model.attention import MaskSpec, attention, cached_attention, matmul as _matmul
from apr_jax.model.config import LlamaConfig

def rope_tables(positions_BT: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """``(sin_BTH, cos_BTH)`` for the HF convention (frequencies repeated over the two halves)."""
    inv_freq_H2 = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles_BTH2 = positions_BT.astype(jnp.float32)[..., None] * inv_freq_H2
    angles_BTH = jnp.concatenate([angles_BTH2, angles_BTH2], axis=-1)
    return jnp.sin(angles_BTH), jnp.cos(angles_BTH)


def apply_rope(x_BTNH: jax.Array, sin_BTH: jax.Array, cos_BTH: jax.Array) -> jax.Array:
    """``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = [-x2, x1]``."""
    x1, x2 = jnp.split(x_BTNH, 2, axis=-1)
    rotated_BTNH = jnp.concatenate([-x2, x1], axis=-1)
    return x_BTNH * cos_BTH[:, :, None, :] + rotated_BTNH * sin_BTH[:, :, None, :]


class RMSNorm(nn.Module):
    """Root-mean-square norm in fp32 with a learned scale (initialised to ones)."""

    eps: float

    @nn.compact
    def __call__(self, x_BTD):
        scale_D = self.param("scale", nn.initializers.ones, (x_BTD.shape[-1],), jnp.float32)
        x_BTD = x_BTD.astype(jnp.float32)
        return x_BTD * jax.lax.rsqrt(jnp.mean(x_BTD**2, axis=-1, keepdims=True) + self.eps) * scale_D


class Attention(nn.Module):
    """Multi-head attention with RoPE, optional grouped KV heads and an optional stacked cache.

    ``kv`` is None (causal self-attention over the tokens) or the whole cache ``(k_LBKSH, v_LBKSH)``, into
    which this layer (index ``layer``) writes its new keys/values before attending over them in place.
    """

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x_BTD, sin_BTH, cos_BTH, spec: MaskSpec, write_at, kv, layer):
        cfg = self.cfg
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        init = nn.initializers.normal(cfg.init_std)
        wq_DNH = self.param("wq", init, (d, n, h), jnp.float32)
        wk_DKH = self.param("wk", init, (d, k, h), jnp.float32)
        wv_DKH = self.param("wv", init, (d, k, h), jnp.float32)
        wo_NHD = self.param("wo", init, (n, h, d), jnp.float32)

        q_BTNH = apply_rope(_matmul(cfg, "BTD,DNH->BTNH", x_BTD, wq_DNH), sin_BTH, cos_BTH)
        k_BTKH = apply_rope(_matmul(cfg, "BTD,DKH->BTKH", x_BTD, wk_DKH), sin_BTH, cos_BTH)
        v_BTKH = _matmul(cfg, "BTD,DKH->BTKH", x_BTD, wv_DKH)
        if kv is None:
            out_BTNH = attention(cfg, q_BTNH, k_BTKH, v_BTKH, spec)
        else:
            kv = (kvc.write(kv[0], layer, k_BTKH, *write_at), kvc.write(kv[1], layer, v_BTKH, *write_at))
            out_BTNH = cached_attention(cfg, q_BTNH, kv[0], kv[1], layer, spec)
        return _matmul(cfg, "BTNH,NHD->BTD", out_BTNH, wo_NHD), kv


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x_BTD):
        cfg = self.cfg
        init = nn.initializers.normal(cfg.init_std)
        d, f = cfg.hidden_size, cfg.intermediate_size
        w_gate_DF = self.param("w_gate", init, (d, f), jnp.float32)
        w_up_DF = self.param("w_up", init, (d, f), jnp.float32)
        w_down_FD = self.param("w_down", init, (f, d), jnp.float32)
        gate_BTF = _matmul(cfg, "BTD,DF->BTF", x_BTD, w_gate_DF)
        up_BTF = _matmul(cfg, "BTD,DF->BTF", x_BTD, w_up_DF)
        return _matmul(cfg, "BTF,FD->BTD", jax.nn.silu(gate_BTF) * up_BTF, w_down_FD)


class Block(nn.Module):
    """One pre-norm transformer block, shaped for ``nn.scan``: ``((x, kv), layer) -> ((x, kv), None)``.

    The stacked cache ``kv`` (or None) rides in the scan carry, so every layer updates it in place;
    ``write_at`` is ``(lengths_B, num_new_B)`` of the cache (or None) and ``layer`` the layer index.
    """

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, carry, sin_BTH, cos_BTH, spec: MaskSpec, write_at, layer):
        cfg = self.cfg
        x_BTD, kv = carry
        h_BTD = RMSNorm(cfg.norm_eps, name="attn_norm")(x_BTD)
        attn_BTD, kv = Attention(cfg, name="attn")(h_BTD, sin_BTH, cos_BTH, spec, write_at, kv, layer)
        x_BTD = x_BTD + attn_BTD
        x_BTD = x_BTD + MLP(cfg, name="mlp")(RMSNorm(cfg.norm_eps, name="mlp_norm")(x_BTD))
        return (x_BTD, kv), None


class Llama(nn.Module):
    """The decoder. Its blocks' parameters are stacked along a leading layer axis (``nn.scan``: one compiled
    block, the training layout); ``unrolled`` runs the blocks as separate modules ``layer_0 ...`` over the
    same weights split per layer (:func:`unstack_layers`): decoding then reads each weight in place instead
    of slicing a copy out of the stack at every step (measured: docs/inference.md)."""

    cfg: LlamaConfig
    unrolled: bool = False

    @nn.compact
    def __call__(self, tokens_BT, positions_BT, spec: MaskSpec, write_at, stacked_kv):
        cfg = self.cfg
        init = nn.initializers.normal(cfg.init_std)
        embedding_VD = self.param("embedding", init, (cfg.vocab_size, cfg.hidden_size), jnp.float32)
        x_BTD = jnp.take(embedding_VD, tokens_BT, axis=0)
        sin_BTH, cos_BTH = rope_tables(positions_BT, cfg.head_dim, cfg.rope_theta)

        if self.unrolled:
            carry = (x_BTD, stacked_kv)
            for i in range(cfg.num_layers):
                carry, _ = Block(cfg, name=f"layer_{i}")(carry, sin_BTH, cos_BTH, spec, write_at, i)
            x_BTD, new_stacked_kv = carry
            return self._head(x_BTD), new_stacked_kv

        block = nn.remat(Block, prevent_cse=False) if cfg.remat else Block
        layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
            length=cfg.num_layers,
        )(cfg, name="layers")
        layer_L = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        (x_BTD, new_stacked_kv), _ = layers((x_BTD, stacked_kv), sin_BTH, cos_BTH, spec, write_at, layer_L)
        return self._head(x_BTD), new_stacked_kv

    def _head(self, x_BTD):
        cfg = self.cfg
        x_BTD = RMSNorm(cfg.norm_eps, name="final_norm")(x_BTD)
        lm_head_DV = self.param("lm_head", nn.initializers.normal(cfg.init_std),
                                (cfg.hidden_size, cfg.vocab_size), jnp.float32)
        return _matmul(cfg, "BTD,DV->BTV", x_BTD, lm_head_DV)


def unstack_layers(params: dict) -> dict:
    """The same weights with the stacked ``layers`` split into ``layer_0 .. layer_{L-1}`` (the unrolled
    layout, which :func:`forward` recognises). Use it once, outside jit, for long decoding loops."""
    if "layers" not in params:
        return params
    layers = params["layers"]
    count = jax.tree.leaves(layers)[0].shape[0]
    out = {k: v for k, v in params.items() if k != "layers"}
    out.update({f"layer_{i}": jax.tree.map(lambda x, i=i: x[i], layers) for i in range(count)})
    return out


def init(cfg: LlamaConfig, key: jax.Array) -> dict:
    """Random parameters (a nested dict of fp32 arrays; block weights have a leading layer axis)."""
    tokens_BT = jnp.zeros((1, 1), jnp.int32)
    spec = MaskSpec(tokens_BT, tokens_BT, tokens_BT, jnp.ones((1,), jnp.int32))

    def init_fn(k):
        return Llama(cfg).init(k, tokens_BT, tokens_BT, spec, None, None)["params"]

    if isinstance(key, jax.core.Tracer):  # already inside the caller's jit / eval_shape
        return init_fn(key)
    # Runs once: skip XLA's backend optimisations, which take seconds on the random samplers on CPU.
    return jax.jit(init_fn, compiler_options={"xla_backend_optimization_level": 0})(key)


def forward(
    cfg: LlamaConfig,
    params: dict,
    tokens: jax.Array,
    positions: jax.Array,
    cache: kvc.KVCache | None = None,
    segment_ids: jax.Array | None = None,
    *,
    valid_lengths: jax.Array | None = None,
) -> tuple[jax.Array, kvc.KVCache | None]:
    """Run the decoder.

    Args:
      cfg: model config (static under jit).
      params: parameters from :func:`init`.
      tokens: ``[B, T]`` int32 token ids, right-padded when rows have different lengths.
      positions: ``[B, T]`` int32 RoPE positions of the tokens.
      cache: optional :class:`~apr_jax.model.kv_cache.KVCache` of ``B`` rows. The new tokens of row ``b``
        are written at slots ``cache.lengths[b] ...`` and attend causally to everything before them; the
        returned cache has ``lengths + valid_lengths``.
      segment_ids: optional ``[B, T]`` int32 packing ids (no cache only): tokens attend only to earlier
        tokens with the same id.
      valid_lengths: optional ``[B]`` int32, the number of valid (left-aligned) tokens per row; the rest is
        padding that is neither attended to nor written to the cache. Defaults to ``T`` for every row.

    Returns:
      ``(logits [B, T, V] float32, new_cache)``; ``new_cache`` is None without a cache. Logits at padding
      positions are finite but meaningless.
    """
    b, t = tokens.shape
    if positions.shape != (b, t):
        raise ValueError(f"positions must have the shape of tokens {(b, t)}, got {positions.shape}")
    num_new_B = jnp.full((b,), t, jnp.int32) if valid_lengths is None else jnp.asarray(valid_lengths)
    num_new_B = num_new_B.astype(jnp.int32)
    if num_new_B.shape != (b,):
        raise ValueError(f"valid_lengths must have shape ({b},), got {num_new_B.shape}")
    if cache is None:
        seg_BT = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids
        if seg_BT.shape != (b, t):
            raise ValueError(f"segment_ids must have the shape of tokens {(b, t)}, got {seg_BT.shape}")
        spec = MaskSpec(jnp.broadcast_to(jnp.arange(t), (b, t)), seg_BT, seg_BT, num_new_B)
        logits_BTV, _ = Llama(cfg, unrolled="layers" not in params).apply(
            {"params": params}, tokens, positions, spec, None, None
        )
        return logits_BTV, None

    if segment_ids is not None:
        raise ValueError("segment_ids (packing) is not supported together with a KV cache")
    if cache.batch_size != b or cache.k.shape[0] != cfg.num_layers:
        raise ValueError(
            f"cache has {cache.k.shape[0]} layers x {cache.batch_size} rows; expected "
            f"{cfg.num_layers} layers x {b} rows"
        )
    s = cache.max_len
    spec = MaskSpec(
        q_slot_BT=cache.lengths[:, None] + jnp.arange(t)[None, :],
        q_seg_BT=jnp.zeros((b, t), jnp.int32),
        k_seg_BS=jnp.zeros((b, s), jnp.int32),
        k_limit_B=cache.lengths + num_new_B,
    )
    write_at = (cache.lengths, num_new_B)
    logits_BTV, (k, v) = Llama(cfg, unrolled="layers" not in params).apply(
        {"params": params}, tokens, positions, spec, write_at, (cache.k, cache.v)
    )
    return logits_BTV, kvc.KVCache(k=k, v=v, lengths=jnp.minimum(cache.lengths + num_new_B, s))
