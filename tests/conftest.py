"""Shared fixtures. Eight fake CPU devices are set up before JAX is imported anywhere, so the sharding
tests can build real meshes; single-device code runs on device 0 as usual."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


def _jsonl(name):
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def golden_apr():
    return _jsonl("golden_apr.jsonl")


@pytest.fixture(scope="session")
def golden_sosp():
    return _jsonl("golden_sosp.jsonl")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A dataset of the tiny preset, generated once per test session."""
    from apr_jax import presets
    from apr_jax.data import datasets

    out = tmp_path_factory.mktemp("tiny_data")
    datasets.generate(presets.load("tiny").data, out, workers=1, progress=False)
    return out
