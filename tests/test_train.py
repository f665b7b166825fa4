"""SFT stage: config validation, the grain pipeline, loss/step maths, resume exactness, checkpoint fallback.

Everything runs on one CPU device with the tiny model on a synthetic, learnable data set.
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import dataclasses  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from apr_jax.data.arrays import TokenArraySource, write_arrays  # noqa: E402
from apr_jax.model.config import tiny as tiny_model  # noqa: E402
from apr_jax.train import data as data_lib  # noqa: E402
from apr_jax.train import sft  # noqa: E402
from apr_jax.train import sharding as sh  # noqa: E402
from apr_jax.train.checkpoint import CheckpointError, RunCheckpointer, load_run  # noqa: E402
from apr_jax.train.config import SFTConfig, tiny as tiny_sft  # noqa: E402
from apr_jax.train.metrics import read_metrics  # noqa: E402

VOCAB = 40
PAD = 0


def _write(folder, n, seed, max_len):
    """Sequences BOS + (counting mod 36, offset 4) + EOS: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(n):
        body = (rng.integers(0, VOCAB - 4) + np.arange(rng.integers(4, max_len))) % (VOCAB - 4) + 4
        seqs.append(np.concatenate([[1], body, [2]]))
    write_arrays(folder, [{"tokens": np.concatenate(seqs), "lengths": [len(s) for s in seqs],
                           "kinds": np.zeros(n, np.uint8), "problem_ids": np.arange(n)}],
                 vocab_size=VOCAB, bos_id=1, eos_id=2, pad_id=PAD)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_data")
    _write(root / "arrays" / "apr_train", 48, 0, max_len=110)
    _write(root / "arrays" / "apr_val", 8, 1, max_len=110)
    return root


def _cfg(**kw):
    base = dict(batch_size=8, seq_len=128, steps=12, log_every=1, eval_every=0, ckpt_every=0,
                keep_checkpoints=2, mesh=(1, 1))
    return tiny_sft(**{**base, **kw})


def _single_device_fns(cfg):
    """Jitted functions on device 0 (cached: tests sharing a config share the compilations)."""
    mesh = sh.make_mesh((1, 1), jax.devices()[:1])
    return mesh, sft.compile_fns(tiny_model(VOCAB), cfg, cfg.steps, mesh)


def _batch(source, rows, length=128, start=0):
    pad = data_lib.PadBatch(length, PAD, "max", 128)
    return pad([source[i] for i in range(start, start + rows)])


# --------------------------------------------------------------------------------------------- config
def test_config_validation_messages():
    with pytest.raises(ValueError, match="exactly one of steps and epochs"):
        SFTConfig(steps=None, epochs=None)
    with pytest.raises(ValueError, match="multiple of grad_accum"):
        SFTConfig(batch_size=10, grad_accum=4)
    with pytest.raises(ValueError, match="pad_policy"):
        SFTConfig(pad_policy="sorted")
    with pytest.raises(ValueError, match="mesh"):
        SFTConfig(mesh=(-1, -1))
    with pytest.raises(ValueError, match="mask_continuation_prompts must be a bool"):
        SFTConfig(mask_continuation_prompts="yes")
    assert SFTConfig.from_dict(SFTConfig().to_dict()) == SFTConfig()
    assert SFTConfig(steps=None, epochs=2.0, batch_size=4).resolve_steps(10) == 5


def test_schedule_matches_paper():
    cfg = SFTConfig()
    schedule = sft.make_schedule(cfg, 19_000)
    assert float(schedule(0)) == pytest.approx(5e-6)
    assert float(schedule(1)) == pytest.approx(5e-5)
    assert float(schedule(19_000)) == pytest.approx(5e-7)
    assert float(schedule(9_500)) == pytest.approx((5e-5 + 5e-7) / 2, rel=1e-3)


# ----------------------------------------------------------------------------------------------- data
def test_bucketing_and_truncation(data_dir):
    assert data_lib.bucket_length(1, 4096, "bucket", 128) == 128
    assert data_lib.bucket_length(129, 4096, "bucket", 128) == 256
    assert data_lib.bucket_length(5000, 4096, "bucket", 128) == 4096
    assert data_lib.bucket_length(300, 4096, "pow2", 128) == 512
    assert len(data_lib.possible_lengths(SFTConfig())) == 32
    pad = data_lib.PadBatch(8, PAD, "bucket", 4)
    batch = pad([np.array([1, 5, 6, 2]), np.arange(1, 13)])
    assert batch["tokens"].shape == (2, 8)  # 12 tokens truncated to seq_len 8
    np.testing.assert_array_equal(batch["tokens"][0], [1, 5, 6, 2, 0, 0, 0, 0])
    np.testing.assert_array_equal(batch["loss_mask"][0], [1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(batch["tokens"][1], np.arange(1, 9))
    assert "truncated" in data_lib.truncation_report(np.array([3, 9]), 8)


def test_continuation_prompt_mask_leaves_out_exactly_the_prompt_the_runtime_writes(golden_apr, tmp_path):
    """A parent continuation's loss starts at the first token the parent writes after the join block; the
    prompt is rebuilt with the runtime's own function, and other sequences (and packed neighbours) keep
    every token."""
    from apr_jax.countdown import traces
    from apr_jax.data.tokenizer import build_tokenizer, save_tokenizer

    tok = build_tokenizer("digits")
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    end_id = data_lib.continuation_prompt_end_id(tmp_path)
    assert tok.id_to_token(end_id) == traces.JOIN_CLOSE
    td = next(r["trace_dict"] for r in golden_apr if len(r["trace_dict"]["main_calls"]) > 1)
    first, cont = td["main_calls"][:2]
    returns = [traces.child_return(child["main_calls"][-1]) for child in td["sub_calls"][0]]
    prompt = traces.parent_continuation(first, returns)
    assert cont.startswith(prompt) and len(cont) > len(prompt)

    def ids(text):  # BOS + text + EOS, as the data arrays hold a call
        return np.array(tok.encode(text).ids + [2], np.int32)

    n_prompt = len(tok.encode(prompt).ids)  # BOS included
    a, b = ids(first), ids(cont)
    length = len(a) + len(b)
    # One row holding both calls packed (segments 1 and 2), one row with the continuation alone.
    tokens = np.zeros((2, length + 3), np.int32)
    seg = np.zeros_like(tokens)
    tokens[0, :length], seg[0, :len(a)], seg[0, len(a):length] = np.concatenate([a, b]), 1, 2
    tokens[1, :len(b)], seg[1, :len(b)] = b, 1
    mask = data_lib.continuation_prompt_mask(tokens, seg, end_id)
    assert mask[0, :len(a)].all()  # the first call (it ends at its spawn block) keeps every token
    assert not mask[0, len(a):len(a) + n_prompt].any() and mask[0, len(a) + n_prompt:length].all()
    assert not mask[1, :n_prompt].any() and mask[1, n_prompt:len(b)].all()
    assert not mask[:, length:].any() and not mask[1, len(b):].any()  # padding
    assert tok.decode(b[n_prompt:-1].tolist()) == cont[len(prompt):]
    # The batch functions apply it when given the id, and only then.
    pad = data_lib.PadBatch(4096, PAD, "bucket", 128)
    np.testing.assert_array_equal(pad([b])["loss_mask"][0, :len(b)], np.ones(len(b), bool))
    masked = dataclasses.replace(pad, prompt_end_id=end_id)([b, a])["loss_mask"]
    np.testing.assert_array_equal(masked[0, :len(b)], mask[1, :len(b)])
    assert masked[1, :len(a)].all() and not masked[1, len(a):].any()
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        data_lib.continuation_prompt_end_id(tmp_path / "elsewhere")


def test_iterator_state_resumes_same_batches(data_dir):
    source = TokenArraySource(data_dir / "arrays" / "apr_train")
    for packing in (False, True):
        cfg = _cfg(batch_size=4, packing=packing)
        it = data_lib.train_iterator(source, cfg, PAD)
        for _ in range(15):  # crosses an epoch boundary (48 sequences / 4 per batch = 12 batches)
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        expected = [next(it) for _ in range(3)]
        it.close()
        it = data_lib.train_iterator(source, cfg, PAD, state)
        for want in expected:
            got = next(it)
            for key in data_lib.BATCH_KEYS:
                np.testing.assert_array_equal(got[key], want[key])
        it.close()
        if packing:
            seg, pos = want["segment_ids"], want["positions"]
            assert seg.max() > 1  # several sequences per row
            starts = (seg[:, 1:] != seg[:, :-1]) & (seg[:, 1:] > 0)
            assert (pos[:, 1:][starts] == 0).all()  # positions restart per segment


def test_length_grouping_covers_each_epoch_with_less_padding(data_dir):
    source = TokenArraySource(data_dir / "arrays" / "apr_train")
    cfg = _cfg(batch_size=4, group_by_length=3, bucket_size=8)
    it = data_lib.train_iterator(source, cfg, PAD)
    epoch = [next(it) for _ in range(12)]  # 48 sequences = 4 windows of 3 batches of 4
    state = it.get_state()
    following = next(it)
    it.close()
    seen = sorted(tuple(b["tokens"][r][b["loss_mask"][r]]) for b in epoch for r in range(4))
    assert seen == sorted(tuple(source[i]) for i in range(len(source)))
    plain = data_lib.train_iterator(source, _cfg(batch_size=4, bucket_size=8), PAD)
    plain_eff = np.mean([data_lib.padding_efficiency(next(plain)) for _ in range(12)])
    plain.close()
    assert np.mean([data_lib.padding_efficiency(b) for b in epoch]) > plain_eff + 0.1
    it = data_lib.train_iterator(source, cfg, PAD, state)
    np.testing.assert_array_equal(next(it)["tokens"], following["tokens"])
    it.close()


def test_eval_batches_cover_the_selection_once(data_dir):
    source = TokenArraySource(data_dir / "arrays" / "apr_val")  # 8 sequences
    batches = list(data_lib.eval_batches(source, _cfg(eval_batch_size=3), PAD, max_batches=2))
    assert [b["tokens"].shape[0] for b in batches] == [3, 3]
    seen = sorted(tuple(b["tokens"][r][b["loss_mask"][r]]) for b in batches for r in range(3))
    assert seen == sorted(tuple(source[i]) for i in range(6))
    assert len(list(data_lib.eval_batches(source, _cfg(eval_batch_size=3), PAD))) == 3  # last one padded


def test_epochs_are_reshuffled(data_dir):
    source = TokenArraySource(data_dir / "arrays" / "apr_train")
    it = data_lib.train_iterator(source, _cfg(batch_size=48), PAD)
    first, second = next(it)["tokens"], next(it)["tokens"]
    it.close()
    assert not np.array_equal(first, second)
    assert sorted(map(tuple, first)) == sorted(map(tuple, second))  # same sequences, new order


# ----------------------------------------------------------------------------------------- loss/steps
def test_padding_does_not_change_loss(data_dir):
    source = TokenArraySource(data_dir / "arrays" / "apr_train")
    mesh, fns = _single_device_fns(_cfg())
    params = fns.init_params(jax.random.PRNGKey(0))
    short, long = _batch(source, 8, 128), _batch(source, 8, 256)
    loss = {}
    for name, batch in (("short", short), ("long", long)):
        total, count = fns.eval(params, sh.shard_batch(batch, mesh))
        loss[name] = float(total / count)
        assert float(count) == sum(len(source[i]) - 1 for i in range(8))
    assert loss["short"] == pytest.approx(loss["long"], rel=1e-6)


def test_loss_falls_on_repeated_batch(data_dir):
    mesh, fns = _single_device_fns(_cfg())
    state = sft.init_state(fns, jax.random.PRNGKey(0))
    batch = sh.shard_batch(_batch(TokenArraySource(data_dir / "arrays" / "apr_train"), 8), mesh)
    losses = []
    for _ in range(12):
        state, metrics = fns.step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[0] == pytest.approx(np.log(VOCAB), abs=0.3)
    assert losses[-1] < losses[0] - 1.0, losses


def test_grad_accumulation_equals_full_batch(data_dir):
    batch = _batch(TokenArraySource(data_dir / "arrays" / "apr_train"), 8)
    results = []
    for accum in (1, 2):
        cfg = _cfg(grad_accum=accum)
        mesh, fns = _single_device_fns(cfg)
        state = sft.init_state(fns, jax.random.PRNGKey(0))
        for _ in range(2):
            state, metrics = fns.step(state, sh.shard_batch(batch, mesh))
        results.append((float(metrics["loss"]), jax.device_get(state.params)))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), results[0][1], results[1][1])


def test_nonfinite_step_is_skipped(data_dir):
    cfg = _cfg()
    mesh, fns = _single_device_fns(cfg)
    state = sft.init_state(fns, jax.random.PRNGKey(0))
    params = dict(state.params)
    params["lm_head"] = params["lm_head"].at[0, 0].set(jnp.nan)
    state = state._replace(params=params)
    before = jax.device_get(state.params)
    batch = sh.shard_batch(_batch(TokenArraySource(data_dir / "arrays" / "apr_train"), 8), mesh)
    state, metrics = fns.step(state, batch)
    assert not bool(metrics["ok"]) and int(state.nonfinite) == 1 and int(state.step) == 1
    jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(state.params))


def test_nonfinite_batch_is_kept_for_inspection(tmp_path):
    batch = {"tokens": np.arange(12, dtype=np.int32).reshape(2, 6), "loss_mask": np.ones((2, 6), bool)}
    path = sft.save_nonfinite_batch(tmp_path, 7, batch)
    assert path == tmp_path / "nonfinite" / "step_7.npz"
    with np.load(path) as saved:
        assert sorted(saved) == ["loss_mask", "tokens"]
        np.testing.assert_array_equal(saved["tokens"], batch["tokens"])


# ------------------------------------------------------------------------------------ runs and resume
def _final_params(run_dir):
    return jax.device_get(load_run(run_dir)[1])


def _train_losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"}


def test_resume_after_sigterm_is_exact_and_corrupt_checkpoint_falls_back(data_dir, tmp_path, caplog):
    model, cfg, one = tiny_model(VOCAB), _cfg(), jax.devices()[:1]
    straight = sft.train(model, cfg, data_dir, "apr", tmp_path / "straight", devices=one)
    assert straight["final_step"] == 12 and not straight["interrupted"]
    for name in ("config.json", "metrics.jsonl", "loss.png", "checkpoints/12", "tensorboard"):
        assert (tmp_path / "straight" / name).exists(), name
    assert straight["val_loss"] is not None

    def kill_at_5(step):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    run = tmp_path / "resumed"
    first = sft.train(model, cfg, data_dir, "apr", run, devices=one, step_callback=kill_at_5)
    assert first["interrupted"] and first["final_step"] == 5
    with pytest.raises(FileExistsError, match="resume=True"):
        sft.train(model, cfg, data_dir, "apr", run, devices=one)
    second = sft.train(model, cfg, data_dir, "apr", run, resume=True, devices=one)
    assert second["start_step"] == 5 and second["final_step"] == 12
    assert _train_losses(run) == _train_losses(tmp_path / "straight")  # same batches, same maths
    expected = _final_params(tmp_path / "straight")
    jax.tree.map(np.testing.assert_array_equal, expected, _final_params(run))

    # Garble checkpoint 12 and fake a partial checkpoint 13: resuming moves both aside and redoes
    # steps 6-12 from checkpoint 5, exactly.
    for path in (run / "checkpoints" / "12" / "params").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    (run / "checkpoints" / "13" / "params").mkdir(parents=True)
    caplog.clear()
    with pytest.raises(CheckpointError, match=str(run / "checkpoints")):
        RunCheckpointer(run / "checkpoints", read_only=True).restore(
            jax.eval_shape(lambda: expected), step=12)
    third = sft.train(model, cfg, data_dir, "apr", run, resume=True, devices=one)
    assert third["start_step"] == 5 and "unreadable" in caplog.text
    assert (run / "checkpoints.corrupt" / "12").exists() and (run / "checkpoints.corrupt" / "13").exists()
    jax.tree.map(np.testing.assert_array_equal, expected, _final_params(run))


def test_load_run_errors_name_the_directory(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        load_run(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(
        {"preset": None, "method": "apr", "model": dataclasses.asdict(tiny_model(VOCAB)), "train": {}}))
    with pytest.raises(CheckpointError, match="checkpoints"):
        load_run(tmp_path)
    shutil.rmtree(tmp_path)


def test_init_from_another_run_starts_from_its_parameters_with_a_fresh_optimizer(data_dir, tmp_path):
    model, one = tiny_model(VOCAB), jax.devices()[:1]
    sft.train(model, _cfg(steps=4), data_dir, "apr", tmp_path / "base", devices=one)
    base = _final_params(tmp_path / "base")
    # a learning rate of ~0 keeps the parameters where they start: they must be the base run's
    still = _cfg(steps=1, init_lr=1e-12, peak_lr=1e-12, end_lr=1e-12, warmup_steps=0, weight_decay=0.0)
    out = sft.train(model, still, data_dir, "apr", tmp_path / "tuned", devices=one, init_from=tmp_path / "base")
    assert out["start_step"] == 0 and out["final_step"] == 1  # its own schedule, from step 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-8), base, _final_params(tmp_path / "tuned"))
    record = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert record["init"] == {"run": str((tmp_path / "base").absolute()), "method": "apr", "step": 4}
    sft.train(model, still, data_dir, "apr", tmp_path / "fresh", devices=one)  # no init: random parameters
    assert not np.allclose(jax.tree.leaves(base)[0], jax.tree.leaves(_final_params(tmp_path / "fresh"))[0])
    # a resumed run keeps its own checkpoints and its init record
    sft.train(model, dataclasses.replace(still, steps=2), data_dir, "apr", tmp_path / "tuned", resume=True,
              devices=one, init_from=tmp_path / "base")
    assert json.loads((tmp_path / "tuned" / "config.json").read_text())["init"]["step"] == 4
    with pytest.raises(ValueError, match="model config differs in hidden_size"):
        sft.train(dataclasses.replace(model, hidden_size=32), still, data_dir, "apr", tmp_path / "other",
                  devices=one, init_from=tmp_path / "base")
