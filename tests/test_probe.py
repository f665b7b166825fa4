"""The teacher-forced skill probe: token kinds from the trace grammar, accuracies from a predictor."""

import json
from pathlib import Path

import numpy as np

from apr_jax.data import tokenizer as T
from apr_jax.train.probe import probe, token_kinds

FIXTURES = Path(__file__).parent / "fixtures"


def _golden_sosp(k=0):
    return json.loads((FIXTURES / "golden_sosp.jsonl").read_text().splitlines()[k])


def _pieces(tok, text):
    return [tok.id_to_token(i) for i in T.encode(tok, text) if i > 3 or tok.id_to_token(i) not in ("<s>", "</s>")]


def test_token_kinds_follow_the_grammar():
    tok = T.build_tokenizer("integers", 3)
    text = ("Current State: 50:[4, 30, 16, 16], Operations: []\n"
            "Exploring Operation: 16/16=1, Resulting Numbers: [4, 30, 1]\n"
            "Generated Node #0,0: 50:[4, 30, 1] Operation: 16/16=1\n")
    pieces = _pieces(tok, text)
    assert "".join(pieces) == text
    kinds, states = token_kinds(pieces)
    got = [(p, k) for p, k in zip(pieces, kinds) if k != "other"]
    assert got == [("50", "state"), ("4", "state"), ("30", "state"), ("16", "state"), ("16", "state"),
                   ("16", "operands"), ("/", "operator"), ("16", "operands"), ("1", "result"),
                   ("4", "resulting"), ("30", "resulting"), ("1", "resulting"),
                   ("0", "generated"), ("0", "generated"), ("50", "generated"), ("4", "generated"),
                   ("30", "generated"), ("1", "generated"), ("16", "generated"), ("16", "generated"),
                   ("1", "generated")]
    # every token of the exploring line sees the state above it
    explore = pieces.index("Exploring Operation: ")
    assert states[explore + 1] == {4, 30, 16}


def test_malformed_lines_are_other():
    tok = T.build_tokenizer("integers", 3)
    pieces = _pieces(tok, "Exploring Operation: 16/16, Resulting\nCurrent State: 5:[1, 2")
    kinds, _ = token_kinds(pieces)
    assert set(kinds) == {"other"}


def test_probe_scores_an_oracle_and_a_constant_predictor():
    tok = T.build_tokenizer("integers", 3)
    _, bos, _ = T.special_ids(tok)
    text = _golden_sosp()["search_path"]
    seq = np.array([bos] + T.encode(tok, text), np.int32)
    seq = seq[seq != T.special_ids(tok)[2]]  # no EOS
    seqs = [seq, seq[:300]]

    def oracle(tokens, lengths):
        return np.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)

    result = probe(oracle, tok, seqs)
    assert all(v["accuracy"] == 1.0 for v in result.values() if v["tokens"])
    assert result["operands"]["tokens"] > 0 and result["state"]["tokens"] > 0
    assert result["operand_in_state"]["tokens"] == result["operands"]["tokens"] // 2

    seventy = tok.token_to_id("70")
    result = probe(lambda tokens, lengths: np.full_like(tokens, seventy), tok, seqs)
    assert result["operator"]["accuracy"] == 0.0 and result["other"]["accuracy"] == 0.0
    assert result["operand_in_state"]["accuracy"] == 0.0  # 70 is not in this problem's states


def test_spawn_hazard_groups_line_starts_by_nodes_listed_and_by_what_the_demo_does():
    from apr_jax.countdown import traces
    from apr_jax.data.tokenizer import BOS_ID, EOS_ID, build_tokenizer
    from apr_jax.train.probe import spawn_hazard

    tok = build_tokenizer("integers", 3)
    text = ("Sub Call Budget: 2 Moving to Node #0\nCurrent State: 31:[12, 26, 17], Operations: []\n"
            "Exploring Operation: 12+17=29, Resulting Numbers: [26, 29]\n"
            "Generated Node #0,0: 31:[26, 29] Operation: 12+17=29\n"
            "Exploring Operation: 26-12=14, Resulting Numbers: [17, 14]\n"
            "Generated Node #0,1: 31:[17, 14] Operation: 26-12=14\n" + traces.spawn_block(1, ["0,0", "0,1"]))
    seq = np.array([BOS_ID] + tok.encode(text, add_special_tokens=False).ids + [EOS_ID])
    spawn = tok.token_to_id(traces.SPAWN_OPEN)
    vocab = tok.get_vocab_size()

    def log_probs(ids):  # p(spawn) grows with the position, the rest is spread evenly
        out = np.zeros((len(ids), vocab))
        for j in range(len(ids)):
            p = min(0.9, 0.001 * (j + 1))
            out[j] = np.log((1 - p) / (vocab - 1))
            out[j, spawn] = np.log(p)
        return out

    table = spawn_hazard(log_probs, tok, [seq, seq[:5]])  # the second never spawns: skipped
    assert list(table) == [0, 1, 2]
    assert set(table[0]) == {"go"} and set(table[1]) == {"go"} and set(table[2]) == {"stop"}
    assert all(cell["n"] == 1 for sides in table.values() for cell in sides.values())
    p0, p2 = table[0]["go"]["p_spawn"], table[2]["stop"]["p_spawn"]
    assert 0 < p0 < p2 <= 0.9  # later line starts, higher spawn probability in this fake model
    assert np.isclose(table[2]["stop"]["p_explore"], (1 - p2) / (vocab - 1))


def test_spawn_point_reads_the_distribution_just_before_the_first_spawn():
    from apr_jax.countdown import traces
    from apr_jax.data.tokenizer import BOS_ID, EOS_ID, build_tokenizer
    from apr_jax.train.probe import spawn_point

    tok = build_tokenizer("integers", 3)
    text = ("Moving to Node #0\nCurrent State: 31:[12, 26, 17], Operations: []\n"
            "Exploring Operation: 12+17=29, Resulting Numbers: [26, 29]\n"
            "Generated Node #0,0: 31:[26, 29] Operation: 12+17=29\n" + traces.spawn_block(1, ["0,0"]))
    seq = np.array([BOS_ID] + tok.encode(text, add_special_tokens=False).ids + [EOS_ID])
    ids = {w: tok.token_to_id(w) for w in (traces.SPAWN_OPEN, traces.JOIN_OPEN, "Moving to Node #")}
    before = int(np.flatnonzero(seq == ids[traces.SPAWN_OPEN])[0]) - 1
    vocab = tok.get_vocab_size()

    def log_probs(x):  # spawn 0.6, join marker 0.3, serial 0.05 at the spawn point; uniform elsewhere
        out = np.full((len(x), vocab), np.log(1.0 / vocab))
        out[before] = np.log(0.05 / (vocab - 3))
        for word, p in ((traces.SPAWN_OPEN, 0.6), (traces.JOIN_OPEN, 0.3), ("Moving to Node #", 0.05)):
            out[before, ids[word]] = np.log(p)
        return out

    got = spawn_point(log_probs, tok, [seq, seq[:4]])  # the second has no spawn: skipped
    assert got["n"] == 1
    assert np.isclose(got[traces.SPAWN_OPEN], 0.6) and np.isclose(got[traces.JOIN_OPEN], 0.3)
    assert np.isclose(got["Moving to Node #"], 0.05)
    assert np.isclose(got[traces.EXPLORING], 0.05 / (vocab - 3))
    assert np.isclose(got["other"], 0.05 - 0.05 / (vocab - 3))
