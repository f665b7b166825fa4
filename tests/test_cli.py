"""The command line end to end on the tiny preset: data -> train -> export -> eval."""

import json
import subprocess
import sys

from apr_jax import cli


def test_pipeline_commands(tmp_path, capsys):
    data, run, hf_dir = tmp_path / "data", tmp_path / "run", tmp_path / "hf"
    assert cli.main(["data", "--preset", "tiny", "--out", str(data), "--workers", "1", "--quiet"]) == 0
    assert "problems/s" in capsys.readouterr().out
    assert cli.main(["train", "--preset", "tiny", "--method", "sosp", "--data", str(data), "--out", str(run),
                     "--steps", "6", "--set", "train.eval_every=0", "--set", "train.log_every=3"]) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all("loss" in m for m in metrics)
    assert (run / "loss.png").exists() and (run / "tokenizer.json").exists()

    assert cli.main(["export", "--ckpt", str(run), "--out", str(hf_dir)]) == 0
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 128
    assert (hf_dir / "model.safetensors").exists() and (hf_dir / "tokenizer.json").exists()

    out = tmp_path / "res.jsonl"
    capsys.readouterr()
    assert cli.main(["eval", "--ckpt", str(run), "--mode", "apr", "--n-problems", "3", "--slots", "4",
                     "--context", "128", "--quiet", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["problems"] == 3 == len(records)
    assert json.loads(out.with_suffix(".summary.json").read_text())["accuracy"] == summary["accuracy"]
    assert all(r["threads"] and r["threads"][0]["role"] == "parent" for r in records)
    assert all(r["total_tokens"] <= 128 * (1 + 16 * 9) for r in records)
    assert all(t["stop"] and t["slot"] is not None for r in records for t in r["threads"] if t["role"] == "parent")

    # the same evaluation through `apr-jax serve` (a second process on a free loopback port)
    server = subprocess.Popen([sys.executable, "-m", "apr_jax.cli", "serve", "--ckpt", str(run), "--port", "0",
                               "--slots", "4", "--context", "128"], stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        assert "serving" in line, line
        url = line.split(" on ")[1].split()[0]
        remote = tmp_path / "remote.jsonl"
        assert cli.main(["eval", "--ckpt", str(run), "--mode", "apr", "--n-problems", "3", "--slots", "4",
                         "--context", "128", "--quiet", "--backend", url, "--out", str(remote)]) == 0
    finally:
        server.terminate()
        server.wait(timeout=30)
    via_server = [json.loads(line) for line in remote.read_text().splitlines()]
    assert [[(t["path"], t["output"], t["stop"]) for t in r["threads"]] for r in via_server] == \
        [[(t["path"], t["output"], t["stop"]) for t in r["threads"]] for r in records]

    page = tmp_path / "view.html"
    assert cli.main(["view", str(out), "--problem", str(records[1]["problem"]["id"]), "--out", str(page)]) == 0
    assert records[1]["threads"][0]["path"] in page.read_text()
    assert cli.main(["view", str(out), "--problem", "999999", "--out", str(page)]) == 2


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert cli.main(["train", "--preset", "tiny", "--method", "apr", "--data", str(tmp_path / "missing"),
                     "--out", str(tmp_path / "run")]) == 2
    assert "error" in capsys.readouterr().err
