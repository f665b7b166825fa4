"""Mesh/sharding rules and sharded-training equivalence on 8 fake CPU devices.

``tests/conftest.py`` sets ``--xla_force_host_platform_device_count=8`` before JAX is imported; the guard
below does the same when this file runs on its own.
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from apr_jax.model.config import tiny as tiny_model  # noqa: E402
from apr_jax.train import data as data_lib  # noqa: E402
from apr_jax.train import sft  # noqa: E402
from apr_jax.train import sharding as sh  # noqa: E402
from apr_jax.train.config import tiny as tiny_sft  # noqa: E402

VOCAB = 40
needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")


def test_logical_rules_and_param_axes():
    assert sh.logical_to_spec(("batch", "length")) == P(("data", "fsdp"), None)
    assert sh.param_logical_axes((2, 64, 4, 16), 4) == ("param", "param_shard", "param", "param")
    assert sh.param_logical_axes((2, 64, 176), 4) == ("param", "param", "param_shard")
    assert sh.param_logical_axes((2, 6, 10), 4) == ("param", "param", "param")  # nothing divisible
    assert sh.param_logical_axes((64,), 4) == ("param",)  # vectors stay replicated
    assert sh.param_logical_axes((64, 176), 1) == ("param", "param")
    with pytest.raises(KeyError, match="no rule"):
        sh.logical_to_spec(("heads",))


@needs_8
def test_mesh_shapes_and_errors():
    assert dict(sh.make_mesh((-1, 1)).shape) == {"data": 8, "fsdp": 1}
    assert dict(sh.make_mesh((2, -1)).shape) == {"data": 2, "fsdp": 4}
    with pytest.raises(ValueError, match="does not fit the 8 available"):
        sh.make_mesh((3, 2))
    with pytest.raises(ValueError, match="multiple of 8"):
        sh.check_batch_divisible(12, sh.make_mesh((2, 4)))


def _batches(n, rows=8):
    """Deterministic batches of varying real length (one 128 bucket)."""
    rng = np.random.default_rng(0)
    pad = data_lib.PadBatch(128, 0, "bucket", 128)
    out = []
    for _ in range(n):
        seqs = [np.concatenate([[1], rng.integers(4, VOCAB, rng.integers(5, 120)), [2]]) for _ in range(rows)]
        out.append(pad(seqs))
    return out


def _run(mesh, cfg, batches, params=None):
    """Steps on ``mesh`` from fresh (or given, re-placed) params; returns losses, host params, state."""
    fns = sft.compile_fns(tiny_model(VOCAB), cfg, cfg.steps, mesh)
    if params is None:
        state = sft.init_state(fns, jax.random.PRNGKey(0))
    else:  # skip compiling the (slow to compile) random initialiser for this mesh
        params = jax.device_put(params, fns.state_shardings.params)
        zeros = [jax.device_put(np.zeros((), np.int32), fns.state_shardings.step) for _ in range(2)]
        state = sft.TrainState(zeros[0], params, fns.init_opt(params), zeros[1])
    losses = []
    for batch in batches:
        state, metrics = fns.step(state, sh.shard_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(state.params), state


def _close(a, b):
    # Reductions run in a different order on a mesh. Adam normalises each gradient element, so for an
    # element whose gradient is ~0 that rounding noise can move the update by a fraction of the lr
    # (1e-3 here): atol is 1% of one step's lr; everything else must agree to rtol 1e-5.
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@needs_8
def test_sharded_training_matches_single_device():
    cfg = tiny_sft(batch_size=8, seq_len=128, steps=12, mesh=(1, 1))  # same compile key as test_train
    batches = _batches(3)
    ref_losses, ref_params, _ = _run(sh.make_mesh((1, 1), jax.devices()[:1]), cfg, batches)
    initial = jax.device_get(sft.init_state(
        sft.compile_fns(tiny_model(VOCAB), cfg, cfg.steps, sh.make_mesh((1, 1), jax.devices()[:1])),
        jax.random.PRNGKey(0)).params)

    # (data=2, fsdp=4): parameters are initialised straight into their shards and must equal the
    # single-device initialisation; Adam moments are sharded like their parameters.
    losses, params, state = _run(sh.make_mesh((2, 4)), cfg, batches)
    wq = state.params["layers"]["attn"]["wq"]
    assert wq.sharding.spec == P(None, "fsdp", None, None)
    assert len({str(s.index) for s in wq.addressable_shards}) == 4
    mu = state.opt_state[1][0].mu["layers"]["attn"]["wq"]  # clip, (adam, decay, schedule)
    assert mu.sharding.spec == wq.sharding.spec
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree.map(_close, ref_params, params)

    # (data=8, fsdp=1): pure data parallelism from the same initial parameters.
    losses, params, _ = _run(sh.make_mesh((8, 1)), cfg, batches, params=initial)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree.map(_close, ref_params, params)


@needs_8
def test_checkpoint_saved_on_8_devices_restores_on_1_and_on_4(tmp_path):
    from apr_jax.train.checkpoint import RunCheckpointer, abstract_like

    cfg = tiny_sft(batch_size=8, seq_len=128, steps=12, mesh=(1, 1))
    mesh8 = sh.make_mesh((2, 4))  # parameters and Adam moments split over fsdp=4, rows over 8
    _, saved, state = _run(mesh8, cfg, _batches(1))
    ckpt = RunCheckpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(1, state.params, state.opt_state, {"step": 1})
    ckpt.close()
    for devices, shape in ((jax.devices()[:1], (1, 1)), (jax.devices()[:4], (1, 4)), (jax.devices()[:4], (4, 1))):
        mesh = sh.make_mesh(shape, devices)
        fns = sft.compile_fns(tiny_model(VOCAB), cfg, cfg.steps, mesh)
        abstract = abstract_like(jax.device_get(state.params), fns.state_shardings.params)
        abstract_opt = abstract_like(jax.device_get(state.opt_state), fns.state_shardings.opt_state)
        step, items = RunCheckpointer(tmp_path / "ckpt", read_only=True).restore(abstract, abstract_opt)
        assert step == 1
        wq = items["params"]["layers"]["attn"]["wq"]
        assert {d.id for d in wq.sharding.device_set} == {d.id for d in devices}
        assert len(wq.addressable_shards) == len(devices)
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(items["params"]), saved)
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(items["opt_state"]),
                     jax.device_get(state.opt_state))
