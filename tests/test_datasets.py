"""Dataset generation: determinism across worker counts, resumption, disjoint splits, arrays, import."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from apr_jax import presets
from apr_jax.countdown import game, traces
from apr_jax.countdown.problems import key_of
from apr_jax.data import arrays, datasets, tokenizer as T


def _digest(folder: Path) -> dict:
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != "manifest.json":
            out[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest = json.loads((folder / "manifest.json").read_text())
    out["manifest.stats"] = json.dumps(manifest["stats"], sort_keys=True)
    return out


def test_same_seed_same_bytes_with_one_and_two_workers(tiny_data, tmp_path):
    cfg = presets.load("tiny").data
    datasets.generate(cfg, tmp_path / "w2", workers=2, progress=False)
    assert _digest(tiny_data) == _digest(tmp_path / "w2")


def test_other_seed_gives_other_problems(tiny_data, tmp_path):
    cfg = presets.override(presets.load("tiny").data, seed=1, num_train=16, num_val=4)
    datasets.generate(cfg, tmp_path, workers=1, progress=False)
    a = (tiny_data / "problems_val.jsonl").read_text().splitlines()[:4]
    assert (tmp_path / "problems_val.jsonl").read_text().splitlines() != a


def test_killed_run_resumes_to_identical_bytes(tiny_data, tmp_path, monkeypatch):
    cfg = presets.load("tiny").data
    real = datasets._demo_chunk
    calls = {"n": 0}

    def dying(args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed in the middle of the demonstrations
        return real(args)

    monkeypatch.setattr(datasets, "_demo_chunk", dying)
    with pytest.raises(KeyboardInterrupt):
        datasets.generate(cfg, tmp_path, workers=1, progress=False)
    assert not (tmp_path / "manifest.json").exists()
    assert len(list((tmp_path / ".parts").glob("*.done"))) == 2
    monkeypatch.setattr(datasets, "_demo_chunk", real)
    manifest = datasets.generate(cfg, tmp_path, workers=1, progress=False)
    assert manifest["timing"]["demonstrations_resumed"]
    assert _digest(tiny_data) == _digest(tmp_path)


def test_changed_config_is_refused(tiny_data):
    cfg = presets.override(presets.load("tiny").data, seed=5)
    with pytest.raises(ValueError, match="another config"):
        datasets.generate(cfg, tiny_data, workers=1, progress=False)


def test_splits_are_disjoint_and_solvable(tiny_data):
    train = list(datasets.read_jsonl(tiny_data / "problems_train.jsonl"))
    val = list(datasets.read_jsonl(tiny_data / "problems_val.jsonl"))
    assert len(train) == 64 and len(val) == 16
    train_keys = {key_of(p["nums"], p["target"]) for p in train}
    val_keys = {key_of(p["nums"], p["target"]) for p in val}
    assert not train_keys & val_keys and len(train_keys) == len(train) and len(val_keys) == len(val)
    assert all(game.solvable(p["nums"], p["target"]) for p in train + val)


def test_records_use_release_field_names_and_verify(tiny_data):
    for rec in datasets.read_jsonl(tiny_data / "apr_train.jsonl"):
        assert {"nums", "target", "search_path", "trace_dict", "beam_size", "sub_call_beam_size",
                "token_count", "longest_seq_token_count", "sub_call_count", "rating"} <= set(rec)
        traces.check_demonstration(rec["trace_dict"])
        path = traces.solution_path(rec["search_path"])
        assert rec["solved"] == (path is not None)
        if path:
            assert game.verify_path(rec["nums"], rec["target"], path).ok
    for rec in datasets.read_jsonl(tiny_data / "sosp_train.jsonl"):
        assert rec["search_type"] == f"sosp_{rec['beam_size']}"


def test_arrays_hold_bos_text_eos_of_every_call(tiny_data):
    tok = T.load_tokenizer(tiny_data)
    src = arrays.TokenArraySource(tiny_data / "arrays" / "apr_train")
    recs = list(datasets.read_jsonl(tiny_data / "apr_train.jsonl"))
    expected = [(pid, text) for pid, rec in enumerate(recs) for _, text in traces.iter_calls(rec["trace_dict"])]
    assert len(src) == len(expected)
    for i in (0, len(src) // 2, len(src) - 1):
        seq = src[i]
        assert seq[0] == T.BOS_ID and seq[-1] == T.EOS_ID and seq.dtype == np.int32
        assert T.decode(tok, seq) == expected[i][1] and src.problem_ids[i] == expected[i][0]
    kinds = set(src.kinds.tolist())
    assert kinds <= {arrays.KIND_APR_PARENT, arrays.KIND_APR_CHILD} and arrays.KIND_APR_PARENT in kinds
    with pytest.raises(IndexError):
        src[len(src)]


def test_corrupt_arrays_folder_is_named(tiny_data, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_data / "arrays" / "sosp_val", bad)
    np.save(bad / "offsets.npy", np.arange(3))
    with pytest.raises(ValueError, match="bad: offsets do not match"):
        arrays.TokenArraySource(bad)
    with pytest.raises(FileNotFoundError, match="not a complete arrays folder"):
        arrays.TokenArraySource(tmp_path)


def test_import_official_files(golden_apr, golden_sosp, tmp_path):
    apr_file, sosp_file = tmp_path / "train_apr.json", tmp_path / "train_sosp.json"
    broken = json.loads(json.dumps(golden_apr[1]))
    broken["trace_dict"]["main_calls"][0] = broken["trace_dict"]["main_calls"][0].replace("<End Calling Sub Searches>\n", "")
    apr_file.write_text(json.dumps(golden_apr + [broken], indent=2))  # the release writes one JSON list
    sosp_file.write_text(json.dumps(golden_sosp, indent=4))
    report = datasets.import_official(tmp_path / "out", "train", sosp=str(sosp_file), apr=str(apr_file))
    assert report["apr"] == 30 and report["sosp"] == 30
    assert len(report["rejected"]) == 1 and report["rejected"][0]["index"] == 30
    src = arrays.TokenArraySource(tmp_path / "out" / "arrays" / "apr_train")
    n_calls = sum(1 for r in golden_apr for _ in traces.iter_calls(r["trace_dict"]))
    assert len(src) == n_calls
    tok = T.load_tokenizer(tmp_path / "out")
    assert T.decode(tok, src[0]) == golden_apr[0]["trace_dict"]["main_calls"][0]


def test_external_tokenizer_file_gives_the_same_arrays(tiny_data, tmp_path):
    """An external tokenizer.json goes through the generic (slow) encoder; with our own vocabulary saved
    as that file, the arrays must equal the fast path's bytes."""
    ext = tmp_path / "external.json"
    T.save_tokenizer(T.load_tokenizer(tiny_data), ext)
    cfg = presets.override(presets.load("tiny").data, tokenizer_file=str(ext))
    datasets.generate(cfg, tmp_path / "out", workers=1, progress=False)
    for name in ("sosp_train", "apr_val"):
        a = (tiny_data / "arrays" / name / "tokens.bin").read_bytes()
        assert (tmp_path / "out" / "arrays" / name / "tokens.bin").read_bytes() == a


def test_condition_prefixes_in_arrays(tmp_path):
    cfg = presets.override(presets.load("tiny").data, condition_prefix=True, num_train=16, num_val=4)
    datasets.generate(cfg, tmp_path, workers=1, progress=False)
    tok = T.load_tokenizer(tmp_path)
    sosp = arrays.TokenArraySource(tmp_path / "arrays" / "sosp_train")
    text = T.decode(tok, sosp[0])
    prefix, rest = traces.strip_condition_prefix(text)
    assert prefix == f"Token Budget: {traces.token_budget(len(sosp[0]) - len(T.encode(tok, prefix)), cfg.context)} "
    assert rest.startswith("Current State: ")
    apr = arrays.TokenArraySource(tmp_path / "arrays" / "apr_train")
    for i in range(len(apr)):
        text = T.decode(tok, apr[i])
        if apr.kinds[i] == arrays.KIND_APR_PARENT:
            assert text.startswith("Sub Call Budget: ")
        else:
            assert text.startswith("Moving to Node #0,")


def test_heldout_split_is_disjoint_solvable_and_seeded(tiny_data, tmp_path, capsys):
    from apr_jax import cli

    out = tmp_path / "test.jsonl"
    assert cli.main(["problems", "--data", str(tiny_data), "--n", "40", "--out", str(out)]) == 0
    test = list(datasets.read_jsonl(out))
    seen = {key_of(p["nums"], p["target"])
            for split in ("train", "val") for p in datasets.read_jsonl(tiny_data / f"problems_{split}.jsonl")}
    keys = [key_of(p["nums"], p["target"]) for p in test]
    assert [p["id"] for p in test] == list(range(40)) and len(set(keys)) == 40 and not set(keys) & seen
    assert all(game.solvable(p["nums"], p["target"]) for p in test)
    # the same arguments give the same bytes; another split name, other problems
    again = tmp_path / "again.jsonl"
    cli.main(["problems", "--data", str(tiny_data), "--n", "40", "--out", str(again)])
    assert again.read_bytes() == out.read_bytes()
    other = tmp_path / "other.jsonl"
    cli.main(["problems", "--data", str(tiny_data), "--split", "test2", "--n", "40", "--out", str(other)])
    assert other.read_bytes() != out.read_bytes()
    # a dataset's own split name is refused (its problems are what the new file must avoid)
    assert cli.main(["problems", "--data", str(tiny_data), "--split", "val", "--n", "4", "--out", str(other)]) == 2
    assert "own splits" in capsys.readouterr().err
    # a folder whose config.json is not a data config is named, not a traceback
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"num_layers": 6}')
    assert cli.main(["problems", "--data", str(bad), "--n", "4", "--out", str(other)]) == 2
    assert "not a data config" in capsys.readouterr().err


def test_heldout_split_larger_than_the_task_is_an_error():
    from apr_jax.countdown.problems import ProblemSpec, heldout_problems

    spec = ProblemSpec(num_inputs=2, max_num=3, min_target=2, max_target=3)  # a handful of distinct problems
    assert len(heldout_problems(spec, 0, "test", 3, set())) == 3
    with pytest.raises(ValueError, match="too few distinct problems"):
        heldout_problems(spec, 0, "test", 50, set())
