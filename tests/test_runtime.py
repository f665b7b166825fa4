"""Greedy generation against a plain forward loop, and the SoS+/APR orchestration replaying the release's
golden demonstrations through the shared format functions."""

import jax
import jax.numpy as jnp
import numpy as np

from apr_jax.countdown import traces
from apr_jax.data import tokenizer as T
from apr_jax.inference import runtime
from apr_jax.inference.generate import greedy_generate
from apr_jax.model import config, forward, init


def test_greedy_generate_equals_a_plain_forward_loop():
    cfg = config.tiny(40)
    params = init(cfg, jax.random.PRNGKey(0))
    prompts = [[1, 5, 9, 11], [1, 7], [1, 3, 3, 3, 3, 8, 2 + 10]]
    got = greedy_generate(cfg, params, prompts, max_new_tokens=12, eos_id=2, batch_size=4, quantum=8)
    full = jax.jit(lambda tokens: forward(cfg, params, tokens, jnp.arange(32)[None])[0])
    for prompt, out in zip(prompts, got):
        seq = list(prompt)
        for _ in range(12):  # causal: padding after the sequence does not change the last logits
            logits = full(jnp.asarray([seq + [0] * (32 - len(seq))], jnp.int32))
            nxt = int(jnp.argmax(logits[0, len(seq) - 1]))
            seq.append(nxt)
            if nxt == 2:
                break
        assert out == seq[len(prompt):]


def _oracle(codec, calls):
    """A generator that continues any prefix of a recorded call with the rest of that call + EOS."""
    def generate(prompt_ids, max_new):
        outs = []
        for ids in prompt_ids:
            prompt = codec.text(ids)
            call = next(c for c in calls if c.startswith(prompt))
            outs.append((T.encode(codec.tok, call[len(prompt):]) + [codec.eos_id])[:max_new])
        return outs
    return generate


def test_apr_runtime_replays_golden_demonstrations(golden_apr):
    tok = T.build_tokenizer("digits")
    codec = runtime.Codec(tok, T.BOS_ID, T.EOS_ID)
    recs = golden_apr[:12]
    calls = [t for r in recs for _, t in traces.iter_calls(r["trace_dict"])]
    results = runtime.solve_apr(_oracle(codec, calls), codec, recs, context=16384, max_spawns=8)
    for rec, res in zip(recs, results):
        td = rec["trace_dict"]
        parents = [t["prompt"] + t["output"] for t in res.threads if t["role"] == "parent"]
        assert parents == td["main_calls"]  # every continuation rebuilt byte-exact by the runtime
        assert res.children == traces.count_children(td)
        assert res.correct == (traces.solution_path(rec["search_path"]) is not None)
        assert res.sequential_tokens <= res.total_tokens


def test_apr_runtime_records_malformed_spawns_and_goes_on(golden_apr):
    tok = T.build_tokenizer("digits")
    codec = runtime.Codec(tok, T.BOS_ID, T.EOS_ID)
    rec = golden_apr[0]
    bad = rec["trace_dict"]["main_calls"][0].replace("Moving to Node #0,2\n", "Moving to Node #9,9\n")
    calls = [bad] + [t for r in golden_apr[1:3] for _, t in traces.iter_calls(r["trace_dict"])]
    results = runtime.solve_apr(_oracle(codec, calls), codec, golden_apr[:3], context=16384)
    assert "malformed spawn" in results[0].reason and not results[0].correct
    assert [r.correct for r in results[1:]] == [traces.solution_path(r["search_path"]) is not None
                                                for r in golden_apr[1:3]]


def test_sosp_runtime_marks_truncated_threads(golden_sosp):
    tok = T.build_tokenizer("digits")
    codec = runtime.Codec(tok, T.BOS_ID, T.EOS_ID)
    recs = golden_sosp[:4]
    gen = _oracle(codec, [r["search_path"] for r in recs])
    full = runtime.solve_sosp(gen, codec, recs, context=16384)
    assert [r.correct for r in full] == [traces.solution_path(r["search_path"]) is not None for r in recs]
    short = runtime.solve_sosp(gen, codec, recs, context=64)
    assert all(not r.correct and "length" in r.reason for r in short)
    assert np.all([r.total_tokens <= 64 for r in short])
