"""Arithmetic fact sheets (apr_jax.data.facts): the table, the sheets, and their mixing into SFT data."""

import re

import numpy as np
import pytest

from apr_jax.data import facts
from apr_jax.data import tokenizer as tokenization
from apr_jax.train.config import SFTConfig
from apr_jax.train import data as data_lib

FACT = re.compile(r"^(\d+)([-+*/])(\d+)=(\d+)$")


def test_fact_table_is_every_solver_operation_and_only_those():
    table = facts.fact_table(3)
    # + and * in both orders (9 + 9), larger-minus-smaller over unordered pairs (6), exact divisions (5)
    assert len(table) == len(set(table)) == 29
    assert {"1+2=3", "2+1=3", "3*2=6", "2*3=6", "3-1=2", "2-2=0", "3/1=3", "2/2=1"} <= set(table)
    assert not {"1-3=-2", "3/2=1", "2/3=0", "1/2=0"} & set(table)
    for line in facts.fact_table(12):
        a, op, b, c = FACT.match(line).groups()
        a, b, c = int(a), int(b), int(c)
        assert {"+": a + b, "*": a * b, "-": a - b, "/": a // b}[op] == c
        if op in "-/":
            assert a >= b
        if op == "/":
            assert a % b == 0
    with pytest.raises(ValueError, match="max_operand"):
        facts.fact_table(0)


@pytest.fixture(scope="module")
def encoder():
    return tokenization.FastEncoder(tokenization.build_tokenizer("integers", 3))


def test_sheets_cover_the_table_once_per_pass_and_lengths_are_exact(encoder):
    sheets = facts.FactSheets(encoder, bos_id=1, eos_id=2, num_sheets=9, facts_per_sheet=7, max_operand=4)
    table = facts.fact_table(4)
    assert sheets.sheets_per_pass == -(-len(table) // 7)
    for i in range(len(sheets)):
        ids = sheets[i]
        assert len(ids) == sheets.lengths[i]
        assert ids[0] == 1 and ids[-1] == 2 and ids.dtype == np.int32
    lines = []
    tok = tokenization.build_tokenizer("integers", 3)
    for i in range(sheets.sheets_per_pass):
        lines += tokenization.decode(tok, sheets[i][1:-1].tolist()).split("\n")[:-1]
    assert sorted(lines) == sorted(table)  # every fact exactly once in a pass
    second = tokenization.decode(tok, sheets[sheets.sheets_per_pass][1:-1].tolist()).split("\n")[:-1]
    assert second != lines[:len(second)]  # each pass is a new permutation


def test_sheets_are_a_pure_function_of_the_seed(encoder):
    def make(seed):
        return facts.FactSheets(encoder, bos_id=1, eos_id=2, num_sheets=5, facts_per_sheet=50, seed=seed)

    a, b, c = make(0), make(0), make(1)
    assert all(np.array_equal(a[i], b[i]) for i in range(5))
    assert not np.array_equal(a[0], c[0])
    with pytest.raises(IndexError):
        a[5]


def test_for_fraction_gives_the_asked_share_of_tokens(encoder):
    base = 2_000_000
    sheets = facts.FactSheets.for_fraction(0.25, base, encoder, bos_id=1, eos_id=2)
    share = sheets.num_tokens / (sheets.num_tokens + base)
    assert abs(share - 0.25) < 0.01
    with pytest.raises(ValueError, match="fraction"):
        facts.FactSheets.for_fraction(1.0, base, encoder, bos_id=1, eos_id=2)


def test_concat_source_indexes_across_sources():
    class Src:
        def __init__(self, seqs):
            self.seqs = [np.asarray(s, np.int32) for s in seqs]
            self.lengths = np.asarray([len(s) for s in seqs])

        def __len__(self):
            return len(self.seqs)

        def __getitem__(self, i):
            return self.seqs[i]

    cat = facts.ConcatSource(Src([[1], [2, 2]]), Src([[3, 3, 3]]))
    assert len(cat) == 3
    assert [cat[i].tolist() for i in range(3)] == [[1], [2, 2], [3, 3, 3]]
    assert cat[-1].tolist() == [3, 3, 3]
    assert cat.lengths.tolist() == [1, 2, 3]
    with pytest.raises(IndexError):
        cat[3]


def test_sft_config_checks_the_fraction():
    assert SFTConfig().arith_facts == 0.0
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="arith_facts"):
            SFTConfig(arith_facts=bad)


def test_training_source_gains_fact_sheets(tiny_data):
    train_src, _ = data_lib.open_sources(tiny_data, "sosp")
    cfg = SFTConfig(arith_facts=0.2, arith_max_operand=20, seq_len=1024, steps=10, batch_size=2)
    mixed = data_lib.with_fact_sheets(train_src, tiny_data, cfg)
    n = len(train_src)
    assert len(mixed) > n and np.array_equal(mixed[0], train_src[0])
    base = int(np.minimum(train_src.lengths, cfg.seq_len).sum())
    extra = int(mixed.lengths[n:].sum())
    assert abs(extra / (extra + base) - 0.2) < 0.05
    tok = tokenization.load_tokenizer(tiny_data / "tokenizer.json")
    first_fact = tokenization.decode(tok, mixed[n][1:].tolist()).split("\n")[0]
    a, op, b, c = FACT.match(first_fact).groups()
    assert int(a) <= 20 and int(b) <= 20
    batch = next(iter(data_lib.train_iterator(mixed, cfg, train_src.meta["pad_id"])))
    assert batch["tokens"].shape[0] == 2


def test_sheets_reject_a_tokenizer_that_cannot_write_the_facts():
    class UnknownEverywhere:
        def encode_many(self, texts):
            return [np.full(3, 3, np.int32) for _ in texts]

    with pytest.raises(ValueError, match=r"arithmetic fact '1\+1=2'"):
        facts.FactSheets(UnknownEverywhere(), bos_id=1, eos_id=2, num_sheets=1, max_operand=2, unk_id=3)


def test_tokenizer_model_and_fast_encoder_write_the_same_sheets():
    tok = tokenization.build_tokenizer("integers", 3)
    kwargs = dict(bos_id=1, eos_id=2, num_sheets=3, facts_per_sheet=40, max_operand=40, unk_id=3)
    fast = facts.FactSheets(tokenization.FastEncoder(tok), **kwargs)
    model = facts.FactSheets(tokenization.HFEncoder(tok), **kwargs)
    assert all(np.array_equal(fast[i], model[i]) for i in range(3))
