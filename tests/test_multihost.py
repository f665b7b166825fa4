"""Two processes joined by jax.distributed (4 fake CPU devices each, gloo collectives) train exactly what one
process with 8 devices trains, and write one run folder (checkpoints written once, cooperatively)."""

import json
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from apr_jax import presets
from apr_jax.data import datasets
from apr_jax.train import sft
from apr_jax.train.checkpoint import load_run

WORKER = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    from apr_jax.train import distributed
    coordinator, pid, data, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    assert distributed.initialize(coordinator, 2, pid)
    import dataclasses, jax
    from apr_jax import presets
    from apr_jax.train import sft
    assert jax.process_count() == 2 and jax.device_count() == 8
    preset = presets.load("tiny")
    cfg = dataclasses.replace(preset.train, steps=4, batch_size=8, eval_every=0, ckpt_every=2, log_every=2)
    summary = sft.train(preset.model, cfg, data, "sosp", out)
    print("LOSS", summary["train_loss"], flush=True)
    jax.distributed.shutdown()
""")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices for the single-process reference")
def test_two_processes_train_what_one_process_with_8_devices_trains(tmp_path):
    preset = presets.load("tiny")
    data = tmp_path / "data"
    datasets.generate(preset.data, data, workers=1, progress=False)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    coordinator = f"127.0.0.1:{_free_port()}"
    multi = tmp_path / "multi"
    procs = [subprocess.Popen([sys.executable, str(script), coordinator, str(pid), str(data), str(multi)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for pid in (0, 1)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
    losses = [float(line.split()[1]) for out in outputs for line in out.splitlines() if line.startswith("LOSS")]
    assert len(losses) == 2 and losses[0] == losses[1]  # both processes saw the same global loss

    import dataclasses

    cfg = dataclasses.replace(preset.train, steps=4, batch_size=8, eval_every=0, ckpt_every=2, log_every=2)
    single = sft.train(preset.model, cfg, data, "sosp", tmp_path / "single")
    assert single["train_loss"] == pytest.approx(losses[0], rel=1e-5)
    _, multi_params = load_run(multi)
    _, single_params = load_run(tmp_path / "single")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 jax.device_get(multi_params), jax.device_get(single_params))
    metrics = (multi / "metrics.jsonl").read_text().splitlines()
    rows = [(json.loads(m)["step"], json.loads(m)["split"]) for m in metrics]
    assert rows == [(2, "train"), (4, "train"), (4, "val")]  # written once, by the primary process
    assert sorted(p.name for p in (multi / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
