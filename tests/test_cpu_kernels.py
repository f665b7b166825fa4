"""The fused CPU decode-attention kernel (an XLA FFI custom call) against the XLA path it replaces."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apr_jax.model import attention, cpu_kernels, llama
from apr_jax.model import forward, init_cache
from apr_jax.model import config as model_config
from apr_jax.model.attention import MaskSpec

needs_kernel = pytest.mark.skipif(cpu_kernels._compiler() is None, reason="no C++ compiler on this machine")


def _case(num_heads, num_kv_heads, head_dim, lengths, slots=96, layers=3, seed=0):
    cfg = model_config.tiny(64, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
    rng = np.random.default_rng(seed)
    b = len(lengths)
    k = jnp.asarray(rng.normal(size=(layers, b, num_kv_heads, slots, head_dim)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(layers, b, num_kv_heads, slots, head_dim)), jnp.float32)
    q = jnp.asarray(rng.normal(size=(b, 1, num_heads, head_dim)), jnp.float32)
    lengths = jnp.asarray(lengths, jnp.int32)
    # the new token sits at slot lengths-1 (already written), as in a decode step
    spec = MaskSpec(lengths[:, None] - 1, jnp.zeros((b, 1), jnp.int32), jnp.zeros((b, slots), jnp.int32), lengths)
    return cfg, q, k, v, spec


@needs_kernel
# MHA, GQA, MQA, wide H, GQA at wide H, odd H; lengths below cover both sides of the 16-key steps
@pytest.mark.parametrize("heads", [(4, 4, 16), (4, 2, 16), (2, 1, 32), (2, 2, 64), (4, 2, 64), (2, 2, 24)])
def test_kernel_matches_xla_attention(heads):
    assert cpu_kernels.available()
    cfg, q, k, v, spec = _case(*heads, lengths=[0, 1, 7, 95, 96])
    for layer in (0, 2):
        fused = jax.jit(lambda q, k, v, l: attention.cached_attention(cfg, q, k, v, l, spec))(q, k, v, layer)
        xla = jax.jit(lambda q, k, v, l: attention._cached_attention_xla(cfg, q, k, v, l, spec))(q, k, v, layer)
        np.testing.assert_allclose(fused, xla, atol=2e-6)
        assert not np.any(np.asarray(fused[0]))  # a row that sees no key gets zeros


@needs_kernel
def test_kernel_reads_only_the_visible_keys():
    cfg, q, k, v, spec = _case(4, 2, 16, lengths=[5, 40])
    out = attention.cached_attention(cfg, q, k, v, 1, spec)
    garbage = k.at[:, 0, :, 5:].set(1e4).at[:, 1, :, 40:].set(-1e4)  # past each row's limit
    np.testing.assert_array_equal(out, attention.cached_attention(cfg, q, garbage, v.at[:, :, :, 40:].set(7.0), 1, spec))
    other_layer = k.at[0].set(0.0).at[2].set(0.0)
    np.testing.assert_array_equal(out, attention.cached_attention(cfg, q, other_layer, v, 1, spec))


@needs_kernel
def test_kernel_reads_a_bf16_cache_as_the_xla_path_does():
    from apr_jax.model import kv_cache

    cfg, q, k, v, spec = _case(4, 2, 32, lengths=[0, 3, 40, 96])
    bits = [jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), kv_cache.BF16_BITS) for x in (k, v)]
    for cache in (bits, [x.astype(jnp.bfloat16) for x in (k, v)]):  # stored as uint16 bits, or as bf16
        fused = jax.jit(lambda q, k, v: attention.cached_attention(cfg, q, k, v, 1, spec))(q, *cache)
        xla = attention._cached_attention_xla(cfg, q, *[kv_cache.entries(x) for x in cache], 1, spec)
        np.testing.assert_allclose(fused, xla, atol=2e-6)
    # the same as fp32 attention over the rounded entries, and not the same as over the exact ones
    rounded = attention._cached_attention_xla(cfg, q, *[x.astype(jnp.bfloat16).astype(jnp.float32) for x in (k, v)],
                                              1, spec)
    np.testing.assert_allclose(fused, rounded, atol=2e-6)
    assert not np.allclose(fused, attention._cached_attention_xla(cfg, q, k, v, 1, spec), atol=1e-4)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        cpu_kernels.decode_attention(q[:, 0], k.astype(jnp.float16), v.astype(jnp.float16), 0,
                                     jnp.ones((4,), jnp.int32), 0.25)


@needs_kernel
def test_decode_step_uses_the_kernel_on_cpu():
    cfg, q, k, v, spec = _case(4, 2, 16, lengths=[3])
    hlo = jax.jit(lambda q, k, v: attention.cached_attention(cfg, q, k, v, 0, spec)).lower(q, k, v).as_text()
    assert cpu_kernels.TARGET in hlo
    # a multi-token extension (prefill) keeps the XLA path
    q2 = jnp.concatenate([q, q], axis=1)
    spec2 = spec._replace(q_slot_BT=jnp.array([[1, 2]]), q_seg_BT=jnp.zeros((1, 2), jnp.int32))
    hlo2 = jax.jit(lambda q, k, v: attention.cached_attention(cfg, q, k, v, 0, spec2)).lower(q2, k, v).as_text()
    assert cpu_kernels.TARGET not in hlo2


def test_failed_build_falls_back_to_xla(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("APR_JAX_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "_compiler", lambda: "/bin/false")
    cpu_kernels.available.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="apr_jax.model.cpu_kernels"):
            assert not cpu_kernels.available()
        assert "using XLA attention" in caplog.text
        assert not list(tmp_path.glob("*.so"))  # no half-written library left behind
        cfg, q, k, v, spec = _case(4, 2, 16, lengths=[3, 9])
        hlo = jax.jit(lambda q, k, v: attention.cached_attention(cfg, q, k, v, 0, spec)).lower(q, k, v).as_text()
        assert cpu_kernels.TARGET not in hlo
        cfg, q, k, v, spec = _train_case(1, 16, 4, 2, 16, 0, False)  # training attention: the XLA path too
        hlo = jax.jit(lambda q, k, v: attention.attention(cfg, q, k, v, spec)).lower(q, k, v).as_text()
        assert cpu_kernels.TRAIN_FWD_TARGET not in hlo
    finally:
        cpu_kernels.available.cache_clear()


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("APR_JAX_CPU_KERNELS", "0")
    cpu_kernels.available.cache_clear()
    try:
        assert not cpu_kernels.available()
    finally:
        cpu_kernels.available.cache_clear()


def test_kernel_rejects_other_dtypes():
    q = jnp.zeros((1, 2, 16), jnp.bfloat16)
    cache = jnp.zeros((1, 1, 2, 8, 16), jnp.float32)
    with pytest.raises(TypeError, match="float32"):
        cpu_kernels.decode_attention(q, cache, cache, 0, jnp.ones((1,), jnp.int32), 0.25)


@needs_kernel
@pytest.mark.parametrize("m,k,n", [(1, 64, 32), (5, 40, 70), (16, 256, 1114), (13, 64, 40), (29, 48, 96)])
def test_packed_matmul_matches_numpy(m, k, n):
    # rows split into tiles of <= 12 (29 -> three), a last panel only partly filled, depth not a multiple of 8
    rng = np.random.default_rng(m)
    x = rng.normal(size=(m, k)).astype(np.float32)
    w = rng.normal(size=(k, n)).astype(np.float32)
    packed = cpu_kernels.pack(jnp.asarray(w))
    p = cpu_kernels.panel_width()
    assert packed.shape == (-(-n // p), k, p)
    y = jax.jit(lambda x, w: cpu_kernels.packed_matmul(x, w, n))(x, packed)
    np.testing.assert_allclose(y, x.astype(np.float64) @ w, rtol=1e-5, atol=1e-4)


@needs_kernel
def test_packed_matmul_checks_its_inputs():
    with pytest.raises(ValueError, match=r"\[K, N\]"):
        cpu_kernels.pack(jnp.zeros((2, 3, 4)))
    with pytest.raises(TypeError, match="float32"):
        cpu_kernels.packed_matmul(jnp.zeros((2, 8), jnp.bfloat16), cpu_kernels.pack(jnp.zeros((8, 4))), 4)
    with pytest.raises(Exception, match="do not agree"):  # more columns than the panels hold
        jax.block_until_ready(cpu_kernels.packed_matmul(jnp.zeros((2, 8)), cpu_kernels.pack(jnp.zeros((8, 4))), 40))


@needs_kernel
def test_packed_weights_give_the_plain_logits():
    cfg = model_config.tiny(72, intermediate_size=100)  # panels only partly used (100, 72 columns)
    params = llama.unstack_layers(llama.init(cfg, jax.random.key(0)))
    packed = llama.pack_for_cpu_decoding(params)
    assert "lm_head_packed" in packed and "wqkv_packed" in packed["layer_0"]["attn"]
    with pytest.raises(ValueError, match="unrolled"):
        llama.pack_for_cpu_decoding(llama.init(cfg, jax.random.key(0)))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 72, size=(3, 6)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(6), (3, 6))

    def decode(p):  # a prefill of 5 tokens, then one decode step of one token per row
        cache = init_cache(cfg, 3, 16)
        _, cache = forward(cfg, p, tokens[:, :5], positions[:, :5], cache)
        logits, _ = forward(cfg, p, tokens[:, 5:], positions[:, 5:], cache)
        return logits

    step = jax.jit(decode)
    hlo = step.lower(packed).as_text()
    assert hlo.count(cpu_kernels.MATMUL_TARGET) == 4 * cfg.num_layers + 1  # qkv, o, gate-up, down; head
    assert cpu_kernels.MATMUL_TARGET not in step.lower(params).as_text()
    np.testing.assert_allclose(step(packed), step(params), atol=2e-5)
    # a multi-token pass keeps the plain weights
    full = jax.jit(lambda p: forward(cfg, p, tokens, positions)[0])
    assert cpu_kernels.MATMUL_TARGET not in full.lower(packed).as_text()
    np.testing.assert_allclose(full(packed)[:, 5:], step(params), atol=2e-5)


def _train_case(b, t, n, kh, h, seed, segments):
    cfg = model_config.tiny(64, num_heads=n, num_kv_heads=kh, head_dim=h, attention_block=32)
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, t, kh, h)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, t, kh, h)), jnp.float32)
    seg = np.sort(rng.integers(0, 3, size=(b, t)), axis=1) if segments else np.zeros((b, t))
    valid = rng.integers(1, t + 1, size=(b,))
    valid[0] = t
    spec = MaskSpec(jnp.broadcast_to(jnp.arange(t), (b, t)), jnp.asarray(seg, jnp.int32), jnp.asarray(seg, jnp.int32),
                    jnp.asarray(valid, jnp.int32))
    return cfg, q, k, v, spec


@needs_kernel
@pytest.mark.parametrize("shape", [(2, 50, 4, 2, 16, 0, False), (3, 64, 4, 4, 32, 1, True), (1, 37, 2, 1, 24, 2, False),
                                   (2, 130, 8, 8, 32, 3, True)])  # GQA, packed MHA, MQA + odd H, > 48 queries
def test_training_kernel_matches_xla_attention_and_gradients(shape, monkeypatch):
    cfg, q, k, v, spec = _train_case(*shape)

    def grad():  # a new function each time: jit must trace again, not reuse its cache
        def loss(q, k, v):
            out = attention.attention(cfg, q, k, v, spec)
            return jnp.sum(out * jnp.cos(out)), out

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

    hlo = grad().lower(q, k, v).as_text()
    assert cpu_kernels.TRAIN_FWD_TARGET in hlo and cpu_kernels.TRAIN_BWD_TARGET in hlo
    (_, fused_out), fused_grads = grad()(q, k, v)
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    assert cpu_kernels.TRAIN_FWD_TARGET not in grad().lower(q, k, v).as_text()
    (_, xla_out), xla_grads = grad()(q, k, v)
    np.testing.assert_allclose(fused_out, xla_out, atol=1e-5)
    for fused, xla in zip(fused_grads, xla_grads):
        np.testing.assert_allclose(fused, xla, atol=2e-5)


@needs_kernel
def test_training_kernel_not_used_for_bf16():
    cfg, q, k, v, spec = _train_case(1, 16, 2, 2, 16, 0, False)
    cfg = dataclasses.replace(cfg, dtype="bfloat16")
    hlo = jax.jit(lambda q, k, v: attention.attention(cfg, q, k, v, spec)).lower(q, k, v).as_text()
    assert cpu_kernels.TRAIN_FWD_TARGET not in hlo


@needs_kernel
def test_engine_packs_weights_on_one_cpu_device_only():
    from apr_jax.inference.engine import Engine
    from apr_jax.train import sharding

    cfg = model_config.tiny(64)
    params = llama.init(cfg, jax.random.key(0))
    assert "lm_head_packed" in Engine(cfg, params, slots=2, eos_id=2).params
    if len(jax.devices()) >= 2:  # a mesh keeps the plain weights (the custom calls have no partitioning rule)
        mesh = sharding.make_mesh((2, 1), devices=jax.devices()[:2])
        assert "lm_head_packed" not in Engine(cfg, params, slots=2, eos_id=2, mesh=mesh).params
