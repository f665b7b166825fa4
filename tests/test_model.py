"""Tests of the Llama decoder, its blockwise attention and the KV cache (tiny config, CPU, seconds each)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apr_jax.model import attention as attention_lib, config, kv_cache, llama

VOCAB = 64
CFG = config.tiny(VOCAB)
SMALL_BLOCKS = dataclasses.replace(CFG, attention_block=8)  # short inputs take the multi-block paths
FULL_LEN = 24  # reference sequences are padded to this length so they share one compilation
# Only compile time matters for these tiny programs, so skip XLA's backend optimisations.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@pytest.fixture(scope="module")
def params():
    return llama.init(CFG, jax.random.key(0))


@functools.partial(jit, static_argnums=0)
def fwd(cfg, params, tokens, positions, cache=None, segment_ids=None, valid_lengths=None):
    return llama.forward(cfg, params, tokens, positions, cache, segment_ids, valid_lengths=valid_lengths)


def full_logits(params, row_tokens):
    """Logits of one sequence computed without a cache (causality makes the right padding harmless)."""
    n = len(row_tokens)
    tokens = np.zeros((1, FULL_LEN), np.int32)
    tokens[0, :n] = row_tokens
    positions = np.arange(FULL_LEN, dtype=np.int32)[None]
    return fwd(CFG, params, tokens, positions)[0][0, :n]


def random_tokens(seed, *shape):
    return np.asarray(jax.random.randint(jax.random.key(seed), shape, 0, VOCAB), np.int32)


# ----------------------------------------------------------------------------- config


def test_paper_parameter_count():
    cfg = config.paper(vocab_size=1000)
    # 18 * (4 * 1024 * 1024 + 3 * 1024 * 2752) + 18 * 2 * 1024 + 1024 (norms)
    assert cfg.num_non_embedding_params() == 227_709_952
    assert round(cfg.num_non_embedding_params() / 1e6, 1) == 227.7
    shapes = jax.eval_shape(lambda: llama.init(cfg, jax.random.key(0)))
    counted = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert counted == cfg.num_params() == 227_709_952 + 2 * 1000 * 1024


def test_tiny_and_mini_counts_match_init(params):
    assert sum(x.size for x in jax.tree.leaves(params)) == CFG.num_params()
    assert 3e6 <= config.mini(VOCAB).num_params() <= 5e6


def test_config_is_hashable_and_validated():
    assert hash(CFG) == hash(config.tiny(VOCAB))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        config.tiny(VOCAB, num_kv_heads=3)
    with pytest.raises(ValueError, match="dtype"):
        config.tiny(VOCAB, dtype="float16")
    with pytest.raises(ValueError, match="head_dim must be even"):
        config.tiny(VOCAB, head_dim=15)
    with pytest.raises(ValueError, match="hidden_size must be a positive int"):
        config.tiny(VOCAB, hidden_size=0)


# ----------------------------------------------------------------------------- forward


def test_forward_shapes_and_jit_matches_eager(params):
    tokens = random_tokens(1, 2, 6)
    positions = np.broadcast_to(np.arange(6, dtype=np.int32), (2, 6))
    eager, cache = llama.forward(CFG, params, tokens, positions)
    jitted, _ = fwd(CFG, params, tokens, positions)
    assert cache is None
    assert eager.shape == (2, 6, VOCAB) and eager.dtype == jnp.float32
    np.testing.assert_allclose(eager, jitted, atol=1e-5)
    assert float(jnp.abs(eager[0] - eager[1]).max()) > 1e-3  # different inputs give different outputs


def test_causality(params):
    seq = 20
    # Every position holds a different token, so embedding row tokens[p] belongs to position p only.
    tokens = np.asarray(jax.random.permutation(jax.random.key(2), VOCAB)[:seq], np.int32)[None]
    positions = np.arange(seq, dtype=np.int32)[None]
    t = 11

    def logit_sum(embedding):
        logits, _ = llama.forward(SMALL_BLOCKS, {**params, "embedding": embedding}, tokens, positions)
        return logits[0, t].sum()

    grad_VD = jit(jax.grad(logit_sum))(params["embedding"])
    row_norms = np.abs(np.asarray(grad_VD)[tokens[0]]).sum(axis=-1)
    assert np.all(row_norms[t + 1 :] == 0.0)
    assert np.all(row_norms[: t + 1] > 0.0)


def test_blockwise_attention_matches_reference_with_gradients():
    """Flash attention (several blocks, GQA, packing, padding) against jax.nn.dot_product_attention."""
    b, t, n, k, h = 2, 29, CFG.num_heads, CFG.num_kv_heads, CFG.head_dim
    keys = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(keys[0], (b, t, n, h))
    kk = jax.random.normal(keys[1], (b, t, k, h))
    v = jax.random.normal(keys[2], (b, t, k, h))
    seg = jnp.asarray(np.repeat([[0, 1, 2]], [10, 12, 7], axis=1).repeat(b, 0), jnp.int32)
    limit = jnp.array([t, 23], jnp.int32)
    spec = attention_lib.MaskSpec(jnp.broadcast_to(jnp.arange(t), (b, t)), seg, seg, limit)
    mask = (seg[:, :, None] == seg[:, None, :]) & (jnp.arange(t)[None, None, :] < limit[:, None, None])
    weights = jax.random.normal(jax.random.key(4), (b, t, n, h))

    def ours(q, kk, v):
        return attention_lib.attention(SMALL_BLOCKS, q, kk, v, spec)

    def reference(q, kk, v):
        return jax.nn.dot_product_attention(q, kk, v, mask=mask[:, None], is_causal=True)

    def with_grads(fn):
        out, vjp = jax.vjp(fn, q, kk, v)
        return out, vjp(weights)

    ours_out, ours_grads = jit(lambda: with_grads(ours))()
    ref_out, ref_grads = jit(lambda: with_grads(reference))()
    np.testing.assert_allclose(ours_out, ref_out, atol=1e-5)
    for ours_grad, ref_grad in zip(ours_grads, ref_grads):
        np.testing.assert_allclose(ours_grad, ref_grad, atol=2e-5)


def test_segment_packing_matches_separate_sequences(params):
    a, b = random_tokens(5, 9), random_tokens(6, 14)
    tokens = np.concatenate([a, b])[None]
    positions = np.concatenate([np.arange(9), np.arange(14)]).astype(np.int32)[None]
    segment_ids = np.asarray([[1] * 9 + [2] * 14], np.int32)
    packed, _ = fwd(SMALL_BLOCKS, params, tokens, positions, segment_ids=segment_ids)
    separate = np.concatenate([full_logits(params, a), full_logits(params, b)])
    np.testing.assert_allclose(packed[0], separate, atol=1e-5)
    unpacked, _ = fwd(SMALL_BLOCKS, params, tokens, positions, segment_ids=np.zeros_like(segment_ids))
    assert float(jnp.abs(unpacked[0, 9:] - separate[9:]).max()) > 1e-4  # the mask matters


def test_bfloat16_close_to_float32(params):
    tokens = random_tokens(7, 2, 16)
    positions = np.broadcast_to(np.arange(16, dtype=np.int32), (2, 16))
    ref, _ = fwd(CFG, params, tokens, positions)
    low, _ = fwd(dataclasses.replace(CFG, dtype="bfloat16"), params, tokens, positions)
    assert low.dtype == jnp.float32
    rel = float(jnp.linalg.norm(low - ref) / jnp.linalg.norm(ref))
    assert 0.0 < rel < 0.05  # bf16 rounding is visible but small


def test_remat_gives_same_gradients(params):
    tokens = random_tokens(8, 2, 10)
    positions = np.broadcast_to(np.arange(10, dtype=np.int32), (2, 10))

    def loss(cfg, p):
        return jnp.mean(llama.forward(cfg, p, tokens, positions)[0] ** 2)

    remat_cfg = dataclasses.replace(CFG, remat=True)
    plain, remat = jit(lambda p: (jax.grad(loss, 1)(CFG, p), jax.grad(loss, 1)(remat_cfg, p)))(params)
    for x, y in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
        np.testing.assert_allclose(x, y, atol=1e-7)
    assert float(jnp.abs(plain["lm_head"]).max()) > 0.0


# ----------------------------------------------------------------------------- KV cache


ROWS, CACHE_LEN = 3, 24  # shared by the cache tests so that they share compilations


def extend(cfg, params, cache, tokens, counts=None):
    """Append ``tokens[b, :counts[b]]`` to every row at its own length (``counts`` defaults to all)."""
    counts = np.full(ROWS, tokens.shape[1], np.int32) if counts is None else np.asarray(counts, np.int32)
    positions = np.asarray(cache.lengths)[:, None] + np.arange(tokens.shape[1], dtype=np.int32)
    return fwd(cfg, params, tokens, positions, cache, None, counts)


def test_decode_token_by_token_matches_full(params):
    seq = random_tokens(9, ROWS, 12)
    cache = kv_cache.init_cache(CFG, ROWS, CACHE_LEN)
    steps = []
    for i in range(12):
        logits, cache = extend(CFG, params, cache, seq[:, i : i + 1])
        steps.append(logits[:, 0])
    np.testing.assert_array_equal(cache.lengths, [12] * ROWS)
    for row in range(ROWS):
        np.testing.assert_allclose(jnp.stack(steps, 1)[row], full_logits(params, seq[row]), atol=1e-5)


@pytest.mark.parametrize("cfg", [CFG, SMALL_BLOCKS], ids=["one_block", "small_blocks"])
def test_ragged_prefill_then_decode_matches_full(params, cfg):
    lengths = np.array([5, 11, 1], np.int32)
    prompt = random_tokens(10, ROWS, 11) * (np.arange(11) < lengths[:, None])  # right-padded with 0
    logits, cache = extend(cfg, params, kv_cache.init_cache(CFG, ROWS, CACHE_LEN), prompt, lengths)
    np.testing.assert_array_equal(cache.lengths, lengths)
    new = random_tokens(11, ROWS, 4)
    decoded = []
    for i in range(4):
        step, cache = extend(cfg, params, cache, new[:, i : i + 1])
        decoded.append(step[:, 0])
    decoded = jnp.stack(decoded, 1)
    for row, n in enumerate(lengths):
        ref = full_logits(params, np.concatenate([prompt[row, :n], new[row]]))
        np.testing.assert_allclose(logits[row, :n], ref[:n], atol=1e-5)
        np.testing.assert_allclose(decoded[row], ref[n:], atol=1e-5)


def test_extend_by_several_tokens_matches_full(params):
    seq = random_tokens(12, ROWS, 14)
    _, cache = extend(CFG, params, kv_cache.init_cache(CFG, ROWS, CACHE_LEN), seq[:, :5])
    # The rows extend by 5, 3 and 0 tokens (padded to 5), then each by 4 more of its own sequence.
    logits_a, cache = extend(CFG, params, cache, seq[:, 5:10], [5, 3, 0])
    np.testing.assert_array_equal(cache.lengths, [10, 8, 5])
    tail = np.stack([seq[row, n : n + 4] for row, n in enumerate([10, 8, 5])])
    logits_b, cache = extend(CFG, params, cache, tail)
    for row, n in enumerate([5, 3, 0]):
        ref = full_logits(params, seq[row, : 5 + n + 4])
        np.testing.assert_allclose(logits_a[row, :n], ref[5 : 5 + n], atol=1e-5)
        np.testing.assert_allclose(logits_b[row], ref[5 + n :], atol=1e-5)


def test_truncate_then_reextend_matches_full(params):
    seq = random_tokens(13, ROWS, 11)
    _, cache = extend(CFG, params, kv_cache.init_cache(CFG, ROWS, CACHE_LEN), seq)
    cache = kv_cache.truncate(cache, np.array([True, False, True]), 4)  # roll rows 0 and 2 back to 4 tokens
    cache = kv_cache.reset(cache, 1)  # and clear row 1
    np.testing.assert_array_equal(cache.lengths, [4, 0, 4])
    branch = random_tokens(14, ROWS, 5)
    logits, cache = extend(CFG, params, cache, branch)
    np.testing.assert_array_equal(cache.lengths, [9, 5, 9])
    for row, prefix in enumerate([4, 0, 4]):
        ref = full_logits(params, np.concatenate([seq[row, :prefix], branch[row]]))
        np.testing.assert_allclose(logits[row], ref[prefix:], atol=1e-5)


def test_truncate_never_extends_and_accepts_indices():
    cache = kv_cache.init_cache(CFG, batch=3, max_len=8).replace(lengths=jnp.array([5, 6, 7], jnp.int32))
    np.testing.assert_array_equal(kv_cache.truncate(cache, np.array([0, 2]), 6).lengths, [5, 6, 6])
    np.testing.assert_array_equal(kv_cache.truncate(cache, 1, np.array([9, 2, 9])).lengths, [5, 2, 7])
    with pytest.raises(ValueError, match="row mask"):
        kv_cache.truncate(cache, np.array([True, False]), 0)


def test_cache_write_drops_overflow_instead_of_clamping():
    cache = jnp.zeros((2, 2, 1, 6, 1))  # [layers, rows, heads, slots, head dim]; only layer 1 is written
    new = jnp.arange(1, 5, dtype=jnp.float32).reshape(1, 4, 1, 1).repeat(2, 0)
    out = jit(kv_cache.write)(cache, 1, new, jnp.array([4, 0]), jnp.array([4, 2]))
    np.testing.assert_array_equal(out[1, 0, 0, :, 0], [0, 0, 0, 0, 1, 2])  # slots 6, 7 fall off the end
    np.testing.assert_array_equal(out[1, 1, 0, :, 0], [1, 2, 0, 0, 0, 0])  # padding is not written
    np.testing.assert_array_equal(out[0], 0.0)
