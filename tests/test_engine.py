"""The slot engine on a tiny random model: exact tokens and log-probabilities against plain forward passes,
thread outputs independent of slots and neighbours, continuations that reuse the cache, stops and limits."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apr_jax.inference.engine import FORCE_WIDTH, Engine
from apr_jax.inference.sampling import GREEDY, Sampling, sample, thread_key
from apr_jax.model import config, forward, init

CFG = dataclasses.replace(config.tiny(48), max_seq_len=96)
EOS = 2


@pytest.fixture(scope="module")
def params():
    return init(CFG, jax.random.PRNGKey(7))


@pytest.fixture(scope="module")
def full_logits(params):
    fn = jax.jit(lambda tokens: forward(CFG, params, tokens, jnp.arange(CFG.max_seq_len)[None])[0])

    def logits(seq):  # causal: padding after the sequence does not change earlier logits
        return np.asarray(fn(jnp.asarray([list(seq) + [0] * (CFG.max_seq_len - len(seq))], jnp.int32))[0])
    return logits


def prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [[1] + rng.integers(3, 48, size=int(rng.integers(1, 20))).tolist() for _ in range(n)]


def run(params, threads, slots, sampling=GREEDY, **kw):
    """Decode ``{key: (prompt, max_new)}`` on a fresh engine; returns ``{key: Finished}``."""
    engine = Engine(CFG, params, slots=slots, eos_id=EOS, sampling=sampling, **kw)
    for key, (prompt, max_new) in threads.items():
        engine.submit(key, prompt, max_new, thread_key(3, "problem", key))
    done = {}
    while not engine.idle:
        for f in engine.step():
            done[f.key] = f
            engine.release(f.key)
    return done


def test_greedy_threads_equal_a_plain_forward_loop_and_record_exact_logprobs(params, full_logits):
    threads = {i: (p, 24) for i, p in enumerate(prompts(7))}
    done = run(params, threads, slots=3)  # 7 threads through 3 slots: refills mid-flight
    for key, (prompt, _) in threads.items():
        seq = list(prompt)
        while len(seq) - len(prompt) < 24:
            seq.append(int(np.argmax(full_logits(seq)[len(seq) - 1])))
            if seq[-1] == EOS:
                break
        f = done[key]
        assert f.tokens == seq[len(prompt):]
        assert f.stop == ("eos" if seq[-1] == EOS else "length")
        logp = jax.nn.log_softmax(full_logits(seq), axis=-1)
        fresh = [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(f.tokens)]
        np.testing.assert_allclose(f.logprobs, fresh, atol=1e-4)


def test_bf16_cache_decodes_what_a_forward_over_a_bf16_cache_predicts(params):
    """``kv_dtype="bfloat16"`` rounds keys and values (not exact against the fp32 forward, by design), and
    is exact against the same model with a bf16 cache: tokens and log-probabilities of one prefill."""
    from apr_jax.model import kv_cache

    threads = {i: (p, 20) for i, p in enumerate(prompts(5, seed=1))}
    engine = Engine(CFG, params, slots=2, eos_id=EOS, kv_dtype="bfloat16")
    assert engine.state.cache.k.dtype == kv_cache.BF16_BITS  # half the bytes of the fp32 cache
    done = run(params, threads, slots=2, kv_dtype="bfloat16")
    fn = jax.jit(lambda tokens: forward(CFG, params, tokens, jnp.arange(CFG.max_seq_len)[None],
                                        kv_cache.init_cache(CFG, 1, dtype=jnp.bfloat16))[0][0])
    for key, (prompt, _) in threads.items():
        f = done[key]
        seq = list(prompt) + f.tokens
        logp = jax.nn.log_softmax(fn(jnp.asarray([seq + [0] * (CFG.max_seq_len - len(seq))], jnp.int32)), axis=-1)
        rows = [len(prompt) - 1 + i for i in range(len(f.tokens))]
        assert f.tokens == [int(jnp.argmax(logp[r])) for r in rows]
        np.testing.assert_allclose(f.logprobs, [float(logp[r, t]) for r, t in zip(rows, f.tokens)], atol=1e-4)
    with pytest.raises(ValueError, match="kv_dtype"):
        Engine(CFG, params, slots=2, eos_id=EOS, kv_dtype="float16")


def test_sampled_threads_do_not_depend_on_slots_or_neighbours(params):
    sampling = Sampling(temperature=1.0, top_k=20)
    threads = {f"t{i}": (p, 30) for i, p in enumerate(prompts(6, seed=1))}
    alone = {k: run(params, {k: v}, slots=1, sampling=sampling)[k].tokens for k, v in list(threads.items())[:2]}
    crowd = run(params, threads, slots=4, sampling=sampling)
    wide = run(params, threads, slots=8, sampling=sampling)
    for k in threads:
        assert crowd[k].tokens == wide[k].tokens
    for k, tokens in alone.items():
        assert crowd[k].tokens == tokens
    assert len({tuple(f.tokens) for f in crowd.values()}) > 1  # the keys differ per thread
    greedy = run(params, threads, slots=4)
    assert any(greedy[k].tokens != crowd[k].tokens for k in threads)


def test_continuation_reuses_the_cached_prefix(params, full_logits):
    engine = Engine(CFG, params, slots=2, eos_id=EOS)
    first = prompts(1, seed=2)[0]
    engine.submit("a", first, 10, thread_key(0, 0, "a"))
    (f,) = engine.step()
    # Continue with the thread's own text minus its last 3 tokens, plus new tokens (a join block).
    kept = first + f.tokens[:-3]
    cont = kept + [5, 6, 7, 8]
    engine.continue_thread("a", cont, 12, thread_key(0, 0, "b"), new_key="b")
    with pytest.raises(KeyError):
        engine.release("a")
    (g,) = engine.step()
    assert g.key == "b" and g.slot == f.slot
    assert g.new_prompt_tokens == len(cont) - len(kept)  # only the new tokens were prefilled
    seq = list(cont)
    for _ in range(len(g.tokens)):
        seq.append(int(np.argmax(full_logits(seq)[len(seq) - 1])))
    assert g.tokens == seq[len(cont):]


def test_stop_sequences_limits_and_context(params):
    prompt = prompts(1, seed=3)[0]
    free = run(params, {"x": (prompt, 20)}, slots=1)["x"]
    assert free.stop == "length" and len(free.tokens) == 20
    marker = free.tokens[4:6]
    stopped = run(params, {"x": (prompt, 20)}, slots=1, stop_sequences=[marker, [99, 98, 97]])["x"]
    first_hit = next(i for i in range(len(free.tokens)) if free.tokens[i:i + 2] == marker)
    assert stopped.stop == "stop_sequence" and stopped.tokens == free.tokens[:first_hit + 2]
    # The context bounds prompt + output whatever max_new says.
    capped = run(params, {"x": (prompt, 500)}, slots=1, context=len(prompt) + 7)["x"]
    assert len(capped.tokens) == 7 and capped.stop == "length"


def test_bad_requests_raise_clear_errors(params):
    engine = Engine(CFG, params, slots=2, eos_id=EOS, context=16)
    with pytest.raises(ValueError, match="leaves no room"):
        engine.submit("x", list(range(1, 17)), 4, thread_key(0, 0, "x"))
    with pytest.raises(ValueError, match="at least one token"):
        engine.submit("x", [], 4, thread_key(0, 0, "x"))
    engine.submit("x", [1, 5], 4, thread_key(0, 0, "x"))
    with pytest.raises(ValueError, match="already exists"):
        engine.submit("x", [1, 5], 4, thread_key(0, 0, "x"))
    with pytest.raises(KeyError, match="not a finished thread"):
        engine.release("x")
    with pytest.raises(ValueError, match="context must be"):
        Engine(CFG, params, slots=2, eos_id=EOS, context=CFG.max_seq_len + 1)


def test_sampling_respects_top_k():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 64))
    keys = jnp.asarray(np.stack([thread_key(0, 0, str(i)) for i in range(64)]))
    tokens, logp = sample(logits, keys, jnp.zeros(64, jnp.int32), Sampling(temperature=1.0, top_k=2))
    assert set(np.asarray(tokens).tolist()) == {0, 1}
    np.testing.assert_allclose(logp, np.log(np.array([0.5, 0.3]))[np.asarray(tokens)], rtol=1e-5)
    with pytest.raises(ValueError):
        Sampling(temperature=-1.0)


def test_sampling_can_record_the_tempered_distribution():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(32, 6)), jnp.float32)
    keys = jnp.asarray(np.stack([thread_key(0, 0, str(i)) for i in range(32)]))
    counters = jnp.zeros(32, jnp.int32)
    tokens, logp_model = sample(logits, keys, counters, Sampling(temperature=0.5))
    tempered_tokens, logp_tempered = sample(logits, keys, counters, Sampling(temperature=0.5, logprob_temperature=0.5))
    np.testing.assert_array_equal(tokens, tempered_tokens)  # what is recorded does not change what is drawn
    rows = np.arange(32), np.asarray(tokens)
    np.testing.assert_allclose(logp_model, np.asarray(jax.nn.log_softmax(logits))[rows], atol=1e-6)
    np.testing.assert_allclose(logp_tempered, np.asarray(jax.nn.log_softmax(logits / 0.5))[rows], atol=1e-6)
    assert not np.allclose(logp_model, logp_tempered)
    with pytest.raises(ValueError, match="logprob_temperature"):
        Sampling(temperature=0.5, logprob_temperature=0.0)


def test_evaluation_resumes_from_its_partial_results(tmp_path):
    import json

    from apr_jax.data import tokenizer as T
    from apr_jax.inference.evaluate import evaluate
    from apr_jax.inference.runtime import RunConfig

    tok = T.build_tokenizer("digits")
    cfg = dataclasses.replace(config.tiny(128), max_seq_len=64)
    params = init(cfg, jax.random.PRNGKey(1))
    problems = [{"id": 10 + i, "nums": [3, 5, i + 1], "target": 12} for i in range(4)]
    run = RunConfig("sc", samples=2)
    sampling = Sampling(temperature=1.0)
    full, _ = evaluate(cfg, params, tok, problems, run, slots=3, sampling=sampling, out=tmp_path / "full.jsonl",
                       progress=False)
    assert not (tmp_path / "full.jsonl.partial").exists()
    # A run killed after two problems left these two lines (and its settings) behind.
    out = tmp_path / "res.jsonl"
    assert json.loads((tmp_path / "full.jsonl").read_text().splitlines()[0])["problem"]["id"] == 10
    evaluate(cfg, params, tok, problems[:2], run, slots=3, sampling=sampling, out=tmp_path / "part.jsonl",
             progress=False)
    (tmp_path / "res.jsonl.partial").write_text((tmp_path / "part.jsonl").read_text())
    header = json.dumps({"run": dataclasses.asdict(run), "sampling": dataclasses.asdict(sampling), "context": 64,
                             "aid": "none", "backend": None},
                        sort_keys=True)
    (tmp_path / "res.jsonl.partial.json").write_text(header)
    resumed, summary = evaluate(cfg, params, tok, problems, run, slots=2, sampling=sampling, out=out,
                                progress=False)
    assert summary["resumed_problems"] == 2
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("threads", "wall_s")} for r in rs]  # noqa: E731
    assert strip(resumed) == strip(full)
    assert [t["output"] for r in resumed for t in r["threads"]] == [t["output"] for r in full for t in r["threads"]]


class _EveryTokenAid:
    """A stand-in aid: after any trigger token, force ``length`` tokens ``trigger + 1, trigger + 2, ...``."""

    def __init__(self, triggers, length=2):
        self.triggers, self.length = tuple(triggers), length

    def force(self, ids):
        return [(ids[-1] + 1 + i) % CFG.vocab_size for i in range(self.length)]


# 2 tokens: fed by the decode loop; FORCE_WIDTH + 3: too many to feed, prefilled into the slot's cache row
@pytest.mark.parametrize("length", [2, FORCE_WIDTH + 3])
def test_aid_forced_tokens_are_spliced_in_place_and_decoding_goes_on_exactly(params, full_logits, length):
    max_new = 30 if length == 2 else 2 * FORCE_WIDTH
    threads = {i: (p, max_new) for i, p in enumerate(prompts(5, seed=4))}
    plain = run(params, threads, slots=2)
    common = np.bincount([t for f in plain.values() for t in f.tokens], minlength=CFG.vocab_size)
    trigger = int(np.argmax(common[3:])) + 3  # a token the model writes often
    aid = _EveryTokenAid([trigger], length)
    done = run(params, threads, slots=2, aid=aid)
    fired = 0
    for key, (prompt, max_new) in threads.items():
        seq, forced = list(prompt), []
        while len(seq) - len(prompt) < max_new:
            seq.append(int(np.argmax(full_logits(seq)[len(seq) - 1])))
            if seq[-1] == EOS:
                break
            if seq[-1] == trigger:
                extra = aid.force(seq)
                if len(seq) - len(prompt) + len(extra) >= max_new:
                    break
                forced += range(len(seq) - len(prompt), len(seq) - len(prompt) + len(extra))
                seq += extra
        f = done[key]
        assert f.tokens == seq[len(prompt):]
        assert f.forced == forced
        fired += bool(forced)
        logp = jax.nn.log_softmax(full_logits(seq), axis=-1)
        sampled = [i for i in range(len(f.tokens)) if i not in set(forced)]
        np.testing.assert_allclose([f.logprobs[i] for i in sampled],
                                   [float(logp[len(prompt) - 1 + i, f.tokens[i]]) for i in sampled], atol=1e-4)
        assert all(f.logprobs[i] == 0.0 for i in forced)
    assert fired >= 2


@pytest.mark.parametrize("shape", [(8, 1), (4, 2)])
def test_slots_sharded_over_a_mesh_decode_exactly_the_threads_of_one_device(params, shape):
    from apr_jax.train import sharding as sh

    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices")
    mesh = sh.make_mesh(shape)
    threads = {i: (p, 20) for i, p in enumerate(prompts(11, seed=5))}  # 11 threads through 8 slots: refills
    for sampling in (GREEDY, Sampling(temperature=1.0, top_k=20)):
        one = run(params, threads, slots=8, sampling=sampling)
        split = run(params, threads, slots=8, sampling=sampling, mesh=mesh)
        for k in threads:
            assert split[k].tokens == one[k].tokens and split[k].stop == one[k].stop
            np.testing.assert_allclose(split[k].logprobs, one[k].logprobs, atol=1e-5)
    engine = Engine(CFG, params, slots=8, eos_id=EOS, mesh=mesh)
    shards = engine.state.cache.k.addressable_shards
    assert len(shards) == 8 and shards[0].data.shape[1] == 1  # one slot's cache row per device
    engine.submit("a", prompts(1)[0], 5, thread_key(0, "p", "a"))
    engine.step()
    assert len(engine.state.cache.k.addressable_shards) == 8 and engine.state.cache.k.sharding.spec[1] is not None
    with pytest.raises(ValueError, match="slots"):
        Engine(CFG, params, slots=6, eos_id=EOS, mesh=mesh)


class _EndingAid:
    """A stand-in aid that ends the thread: after its trigger, force ``[trigger + 1, EOS]``."""

    def __init__(self, trigger):
        self.triggers = (trigger,)

    def force(self, ids):
        return [(ids[-1] + 1) % CFG.vocab_size, EOS]


def test_an_aid_that_forces_eos_ends_the_thread_and_its_continuation_stays_exact(params, full_logits):
    prompt = prompts(1, seed=5)[0]
    plain = run(params, {"a": (prompt, 30)}, slots=1)["a"]
    trigger = next(t for t in plain.tokens[2:] if t != EOS)  # a token the thread writes after a few steps
    cut = plain.tokens.index(trigger) + 1
    engine = Engine(CFG, params, slots=1, eos_id=EOS, aid=_EndingAid(trigger))
    engine.submit("a", prompt, 30, thread_key(3, "problem", "a"))
    (f,) = engine.step()
    assert f.stop == "eos"
    assert f.tokens == plain.tokens[:cut] + [(trigger + 1) % CFG.vocab_size, EOS]
    assert f.forced == [cut, cut + 1]
    # Continue from the text up to the trigger plus a join-like block: the trigger never entered the cache
    # (the aid ended the thread before it was fed), so it is prefilled with the new tokens.
    cont = prompt + plain.tokens[:cut] + [5, 6, 7]
    engine.continue_thread("a", cont, 8, thread_key(0, 0, "b"), new_key="b")
    (g,) = engine.step()
    assert g.new_prompt_tokens == 4
    seq = list(cont)  # the reference: a plain forward loop with the same aid
    while len(seq) - len(cont) < 8 and seq[-1] != EOS:
        seq.append(int(np.argmax(full_logits(seq)[len(seq) - 1])))
        if seq[-1] == trigger:
            seq += [(trigger + 1) % CFG.vocab_size, EOS]
    assert g.tokens == seq[len(cont):]
