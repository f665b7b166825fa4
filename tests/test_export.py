"""Hugging Face export: logits match transformers' LlamaForCausalLM, import round-trips, tokenizer loads."""

import json

import jax
import numpy as np
import pytest

from apr_jax.export import export_hf, import_hf
from apr_jax.model import config, llama

CFG = config.tiny(48)


@pytest.fixture(scope="module")
def params():
    return llama.init(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, params):
    out_dir = tmp_path_factory.mktemp("hf")
    export_hf(CFG, params, str(out_dir))
    return out_dir


def test_logits_match_transformers(exported, params):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(str(exported), dtype=torch.float32).eval()
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, 17), 0, CFG.vocab_size), np.int32)
    positions = np.broadcast_to(np.arange(17, dtype=np.int32), tokens.shape)
    ours, _ = jax.jit(llama.forward, static_argnums=0)(CFG, params, tokens, positions)
    with torch.no_grad():
        theirs = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    assert float(np.abs(ours).max()) > 1e-3  # not a trivially zero comparison
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)


def test_config_json(exported):
    hf = json.loads((exported / "config.json").read_text())
    assert hf["architectures"] == ["LlamaForCausalLM"] and hf["model_type"] == "llama"
    assert hf["tie_word_embeddings"] is False
    assert (hf["num_key_value_heads"], hf["max_position_embeddings"]) == (CFG.num_kv_heads, CFG.max_seq_len)
    assert (hf["bos_token_id"], hf["eos_token_id"], hf["pad_token_id"]) == (1, 2, 0)
    assert (exported / "generation_config.json").exists()


def test_import_round_trip(exported, params):
    cfg, loaded = import_hf(str(exported))
    assert cfg == CFG
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_export_rejects_mismatched_params(tmp_path, params):
    with pytest.raises(ValueError, match="shape"):
        export_hf(config.tiny(49), params, str(tmp_path))


def _write_tokenizer(path):
    import tokenizers

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + list("0123456789+-*/=() "))}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = tokenizers.decoders.Fuse()
    tok.add_special_tokens(specials)
    tok.save(str(path))
    return tok


def test_tokenizer_loads_with_auto_tokenizer(tmp_path, params):
    transformers = pytest.importorskip("transformers")
    tok = _write_tokenizer(tmp_path / "tokenizer.json")
    out_dir = tmp_path / "hf"
    export_hf(CFG, params, str(out_dir), tokenizer_json_path=str(tmp_path / "tokenizer.json"))
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out_dir))
    special_ids = (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id, hf_tok.unk_token_id)
    assert special_ids == (1, 2, 0, 3)
    assert hf_tok.model_max_length == CFG.max_seq_len
    text = "12+34=46"
    ids = hf_tok(text)["input_ids"]
    assert ids == tok.encode(text).ids and len(ids) == len(text)
    assert hf_tok.decode(ids) == text


def test_tokenizer_with_wrong_special_ids_is_rejected(tmp_path, params):
    _write_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match="maps '<s>' to 1"):
        export_hf(CFG, params, str(tmp_path / "hf"), str(tmp_path / "tokenizer.json"), bos_id=5)
