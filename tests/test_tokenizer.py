"""The domain tokenizer: lossless round trips, the fast bulk encoder, and the fixed phrases as one token."""

import random

import pytest
from hypothesis import given, settings, strategies as st

from apr_jax.countdown import solvers, traces
from apr_jax.countdown.heuristics import mult_heuristic
from apr_jax.data import tokenizer as T


@pytest.fixture(scope="module", params=["digits", "integers"])
def tok(request):
    return T.build_tokenizer(request.param, max_int_digits=3)


def _texts(golden_apr, golden_sosp):
    texts = [t for r in golden_apr for _, t in traces.iter_calls(r["trace_dict"])]
    return texts + [r["search_path"] for r in golden_sosp]


def test_round_trip_is_lossless_on_every_golden_call(tok, golden_apr, golden_sosp):
    for text in _texts(golden_apr, golden_sosp):
        assert T.decode(tok, T.encode(tok, text)) == text


def test_fast_encoder_equals_the_tokenizer_json_model(tok, golden_apr, golden_sosp):
    texts = _texts(golden_apr, golden_sosp)
    fast = T.FastEncoder(tok)
    for text, ids in zip(texts, fast.encode_many(texts)):
        assert ids.tolist() == T.encode(tok, text)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 99), min_size=4, max_size=4), st.integers(10, 100), st.integers(0, 10**6))
def test_fast_encoder_equals_tokenizer_on_fresh_demonstrations(nums, target, seed):
    td = solvers.apr(nums, target, 3, 6, mult_heuristic, random.Random(seed))
    texts = [t for _, t in traces.iter_calls(td)] + [solvers.sosp(nums, target, 3, mult_heuristic, random.Random(seed))]
    for mode in ("digits", "integers"):
        tok = T.build_tokenizer(mode)
        for text, ids in zip(texts, T.FastEncoder(tok).encode_many(texts)):
            assert ids.tolist() == T.encode(tok, text)
            assert T.decode(tok, ids) == text


def test_phrases_and_numbers_are_single_tokens():
    digits, ints = T.build_tokenizer("digits"), T.build_tokenizer("integers", max_int_digits=3)
    line = "Exploring Operation: 53-22=31, Resulting Numbers: [26, 1234]"
    pieces = [digits.id_to_token(i) for i in T.encode(digits, line)]
    assert pieces[0] == "Exploring Operation: " and ", Resulting Numbers: " in pieces
    assert pieces[1:3] == ["5", "3"]
    pieces = [ints.id_to_token(i) for i in T.encode(ints, line)]
    assert pieces[1:4] == ["53", "-", "22"]
    assert pieces[-9:] == ["[", "26", ",", " ", "1", "2", "3", "4", "]"]  # 1234 > 999: digit by digit
    assert T.encode(digits, "<Calling Sub Searches>") == [digits.token_to_id("<Calling Sub Searches>")]


def test_special_ids_match_llama_convention(tok):
    assert [tok.token_to_id(t) for t in ("<pad>", "<s>", "</s>", "<unk>")] == [0, 1, 2, 3]
    assert tok.encode("7").ids[0] == T.BOS_ID  # post-processor adds BOS like Llama's tokenizer


def test_saved_tokenizer_loads_identically(tok, tmp_path):
    path = T.save_tokenizer(tok, tmp_path / "tokenizer.json")
    again = T.load_tokenizer(tmp_path)
    text = "Moving to Node #0,1\nCurrent State: 27:[26, 31, 31], Operations: ['53-22=31']"
    assert T.encode(again, text) == T.encode(tok, text) and path.exists()
    with pytest.raises(FileNotFoundError):
        T.load_tokenizer(tmp_path / "missing")
