"""A Llama-2 decoder in Flax Linen, exposed as two pure functions: :func:`init` and :func:`forward`.

Architecture: token embedding, ``num_layers`` pre-norm blocks (RMSNorm -> attention with RoPE and optional
grouped KV heads -> residual; RMSNorm -> SwiGLU MLP -> residual), a final RMSNorm and an untied output
head. No biases; every matrix is initialised from normal(``init_std``). RoPE follows the Hugging Face
``rotate_half`` convention so the weights load into ``transformers.LlamaForCausalLM`` unchanged.

Shape suffixes: B batch, T new tokens (Q: one query block), S key slots (C: one key block), D hidden,
N query heads, K kv heads, G = N // K, H head dim, F MLP width, V vocabulary.

Attention is exact blockwise "flash" attention (:mod:`apr_jax.model.attention`): no more than one
``cfg.attention_block``-sized block of scores exists at a time, forward or backward.

Parameter layouts: stacked (``layers``, training), unrolled (``layer_0 ...``, :func:`unstack_layers`, decoding)
and unrolled plus panel-packed copies of the matrices for CPU decode steps (:func:`pack_for_cpu_decoding`).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from apr_jax.model import cpu_kernels
from apr_jax.model import kv_cache as kvc
from apr_jax.model.attention import MaskSpec, attention, cached_attention, matmul as _matmul
from apr_jax.model.config import LlamaConfig

def rope_tables(positions_BT: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """``(sin_BTH, cos_BTH)`` for the HF convention (frequencies repeated over the two halves)."""
    inv_freq_H2 = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles_BTH2 = positions_BT.astype(jnp.float32)[..., None] * inv_freq_H2
    # sin/cos of each frequency once, then repeated: the same values for half the transcendental calls
    # (XLA:CPU evaluates them one element at a time, visible in a many-row decode step)
    sin_BTH2, cos_BTH2 = jnp.sin(angles_BTH2), jnp.cos(angles_BTH2)
    return jnp.concatenate([sin_BTH2, sin_BTH2], axis=-1), jnp.concatenate([cos_BTH2, cos_BTH2], axis=-1)


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

        if _decoding_packed(self, "wqkv_packed", x_BTD):
            q_BTNH, k_BTKH, v_BTKH = _packed_projections(x_BTD, self.get_variable("params", "wqkv_packed"),
                                                         [(wq_DNH, (n, h)), (wk_DKH, (k, h)), (wv_DKH, (k, h))])
        else:
            q_BTNH = _matmul(cfg, "BTD,DNH->BTNH", x_BTD, wq_DNH)
            k_BTKH = _matmul(cfg, "BTD,DKH->BTKH", x_BTD, wk_DKH)
            v_BTKH = _matmul(cfg, "BTD,DKH->BTKH", x_BTD, wv_DKH)
        q_BTNH = apply_rope(q_BTNH, sin_BTH, cos_BTH)
        k_BTKH = apply_rope(k_BTKH, sin_BTH, cos_BTH)
        if kv is None:
            out_BTNH = attention(cfg, q_BTNH, k_BTKH, v_BTKH, spec)
        else:
            kv = (kvc.write(kv[0], layer, k_BTKH, *write_at), kvc.write(kv[1], layer, v_BTKH, *write_at))
            out_BTNH = cached_attention(cfg, q_BTNH, kv[0], kv[1], layer, spec)
        if _decoding_packed(self, "wo_packed", x_BTD):
            (out_BTD,) = _packed_projections(out_BTNH, self.get_variable("params", "wo_packed"),
                                             [(wo_NHD, (d,))])
            return out_BTD, kv
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
        if _decoding_packed(self, "w_gate_up_packed", x_BTD):
            gate_BTF, up_BTF = _packed_projections(x_BTD, self.get_variable("params", "w_gate_up_packed"),
                                                   [(w_gate_DF, (f,)), (w_up_DF, (f,))])
            (out_BTD,) = _packed_projections(jax.nn.silu(gate_BTF) * up_BTF,
                                             self.get_variable("params", "w_down_packed"), [(w_down_FD, (d,))])
            return out_BTD
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
        if _decoding_packed(self, "lm_head_packed", x_BTD):
            (logits_BTV,) = _packed_projections(x_BTD, self.get_variable("params", "lm_head_packed"),
                                                [(lm_head_DV, (cfg.vocab_size,))])
            return logits_BTV
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


# Weights packed by :func:`pack_for_cpu_decoding`: name -> the matrices it concatenates (their input dims
# flattened first), per module.
_PACKED = {
    "attn": {"wqkv_packed": (("wq", 1), ("wk", 1), ("wv", 1)), "wo_packed": (("wo", 2),)},
    "mlp": {"w_gate_up_packed": (("w_gate", 1), ("w_up", 1)), "w_down_packed": (("w_down", 1),)},
}


def _pack_matrices(module_params: dict, parts) -> jax.Array:
    """Pack each ``[*in, *out]`` weight as ``[prod(in), prod(out)]`` and stack the panels (each part padded
    to whole panels separately, so its columns start at a panel boundary)."""
    panels = []
    for name, in_dims in parts:
        w = module_params[name]
        panels.append(cpu_kernels.pack(w.reshape(math.prod(w.shape[:in_dims]), -1)))
    return jnp.concatenate(panels, axis=0)


def pack_for_cpu_decoding(params: dict) -> dict:
    """Add panel-packed copies of every weight matrix (``*_packed`` entries) to unrolled parameters.

    With them present, decode steps (one new token per row) on CPU run their projections through the
    fused small-row matmul kernel (:mod:`apr_jax.model.cpu_kernels`), the query/key/value and gate/up
    projections each as one call; prefill and every other platform keep the plain weights. Use once,
    outside jit, on the result of :func:`unstack_layers`, and only when ``cpu_kernels.available()``.
    """
    if "layers" in params:
        raise ValueError("pack_for_cpu_decoding takes unrolled parameters (unstack_layers first)")
    out = dict(params)
    for key, block in params.items():
        if not key.startswith("layer_"):
            continue
        block = dict(block)
        for module, packs in _PACKED.items():
            block[module] = dict(block[module])
            for packed_name, parts in packs.items():
                block[module][packed_name] = _pack_matrices(params[key][module], parts)
        out[key] = block
    out["lm_head_packed"] = _pack_matrices(params, (("lm_head", 1),))
    return out


def _decoding_packed(module: nn.Module, name: str, x_BTD) -> bool:
    """Whether this call is a decode step (one token per row) in fp32 with packed weights present."""
    return x_BTD.shape[1] == 1 and module.cfg.dtype != "bfloat16" and module.has_variable("params", name)


def _packed_projections(x_BT_in, packed_PKC, parts):
    """One fused small-row matmul of ``x`` against packed, concatenated weights, split back into one
    ``[B, T, *out]`` array per ``(weight, out_shape)`` of ``parts``. On platforms other than CPU the plain
    weights are used instead (the same fp32 products)."""
    b, t = x_BT_in.shape[:2]
    x_MK = x_BT_in.reshape(b * t, -1).astype(jnp.float32)
    panel = packed_PKC.shape[2]
    widths = [math.prod(out) for _, out in parts]
    starts = [0]
    for width in widths[:-1]:
        starts.append(starts[-1] + -(-width // panel) * panel)

    def fused(x_MK, packed_PKC, *weights):
        y_MN = cpu_kernels.packed_matmul(x_MK, packed_PKC, starts[-1] + widths[-1])
        return [y_MN[:, s:s + w] for s, w in zip(starts, widths)]

    def portable(x_MK, packed_PKC, *weights):
        return [jnp.dot(x_MK, w.reshape(x_MK.shape[1], -1), preferred_element_type=jnp.float32) for w in weights]

    weights = [w for w, _ in parts]
    ys = jax.lax.platform_dependent(x_MK, packed_PKC, *weights, cpu=fused, default=portable)
    return [y.reshape(b, t, *out) for y, (_, out) in zip(ys, parts)]


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
