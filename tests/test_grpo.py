"""GRPO end to end on the tiny preset: the update's direction, equal rewards, exact resume."""

import dataclasses

import jax
import numpy as np
import pytest

from apr_jax import presets
from apr_jax.rl import grpo
from apr_jax.rl.config import GRPOConfig
from apr_jax.train import sft
from apr_jax.train.checkpoint import load_run

LOOP = grpo.LoopConfig(slots=4, micro_batch=8, context=160, eval_every=0, ckpt_every=1)


@pytest.fixture(scope="module")
def sft_run(tiny_data, tmp_path_factory):
    preset = presets.load("tiny")
    out = tmp_path_factory.mktemp("sft")
    cfg = dataclasses.replace(preset.train, steps=2, epochs=None, eval_every=0, log_every=1)
    sft.train(preset.model, cfg, tiny_data, "apr", out)
    return out


def run(sft_run, out, steps=1, **changes):
    cfg = dataclasses.replace(presets.load("tiny").rl, steps=steps, **changes)
    return grpo.train(sft_run, out, cfg, LOOP, progress=False, resume=(out / "checkpoints").exists())


def flat(params):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)])


def test_equal_rewards_leave_the_policy_unchanged(sft_run, tmp_path):
    # The tiny SFT model never solves a problem: every reward is 0, every advantage 0, so the surrogate's
    # gradient is exactly 0; without the KL term (its own gradient is tested in test_rl_math) nothing moves.
    summary = run(sft_run, tmp_path / "rl", kl_beta=0.0)
    assert summary["last"]["reward"] == 0.0
    _, before = load_run(sft_run)
    _, after = load_run(tmp_path / "rl")
    np.testing.assert_array_equal(flat(before), flat(after))


@pytest.mark.parametrize("aggregation", ["tree", "token"])
def test_update_raises_rewarded_and_lowers_unrewarded_rollouts(sft_run, tmp_path, monkeypatch, aggregation):
    seen = []
    real = grpo.rollouts

    def record(*args, **kwargs):
        records = real(*args, **kwargs)
        for i, r in enumerate(records):
            r["correct"] = i % 2 == 0  # the first rollout of each group of two is "right"
        seen.extend(records)
        return records

    monkeypatch.setattr(grpo, "rollouts", record)
    run(sft_run, tmp_path / "rl", learning_rate=1e-3, aggregation=aggregation)
    model_cfg, before = load_run(sft_run)
    _, after = load_run(tmp_path / "rl")

    def seq_logp(params, thread):
        tokens = np.asarray(thread["prompt_ids"] + thread["token_ids"], np.int32)[None]
        logp = grpo._logprobs(model_cfg, params, tokens[:, :-1], tokens[:, 1:])[0]
        return float(logp[len(thread["prompt_ids"]) - 1:].sum())

    delta = {True: [], False: []}
    for r in seen:
        for t in r["threads"]:
            if t.get("token_ids"):
                delta[r["correct"]].append(seq_logp(after, t) - seq_logp(before, t))
    assert delta[True] and delta[False]
    assert np.mean(delta[True]) > 0 > np.mean(delta[False])


def test_killed_run_resumes_exactly(sft_run, tmp_path):
    run(sft_run, tmp_path / "straight", steps=2, learning_rate=1e-3)
    run(sft_run, tmp_path / "resumed", steps=1, learning_rate=1e-3)
    run(sft_run, tmp_path / "resumed", steps=2, learning_rate=1e-3)  # resumes from step 1
    _, straight = load_run(tmp_path / "straight")
    _, resumed = load_run(tmp_path / "resumed")
    np.testing.assert_array_equal(flat(straight), flat(resumed))


def test_step_problems_cover_the_set_before_repeating():
    problems = [{"id": i, "nums": [i], "target": i} for i in range(10)]
    cfg = GRPOConfig(problems_per_step=4)
    first_pass = [p["id"] for s in range(2) for p in grpo.step_problems(problems, cfg, s)] + \
        [p["id"] for p in grpo.step_problems(problems, cfg, 2)][:2]
    assert sorted(first_pass) == list(range(10))
    assert grpo.step_problems(problems, cfg, 1) == grpo.step_problems(problems, cfg, 1)
    groups = grpo.expand_groups(problems[:2], 3)
    assert [g["id"] for g in groups] == ["0#0", "0#1", "0#2", "1#0", "1#1", "1#2"]


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_a_step_on_8_devices_equals_a_step_on_1(sft_run, tmp_path):
    """Rollouts decode with the slots split over the update's mesh; the update is data-parallel."""
    loop = dataclasses.replace(LOOP, slots=8)
    cfg = dataclasses.replace(presets.load("tiny").rl, steps=1, learning_rate=1e-3)
    one = grpo.train(sft_run, tmp_path / "one", cfg, loop, progress=False, devices=jax.devices()[:1])
    eight = grpo.train(sft_run, tmp_path / "eight", cfg, loop, progress=False)
    for key in ("reward", "sequences", "children", "total_tokens"):
        assert one["last"][key] == eight["last"][key]  # the same rollouts
    _, p1 = load_run(tmp_path / "one")
    _, p8 = load_run(tmp_path / "eight")
    np.testing.assert_allclose(flat(p1), flat(p8), rtol=1e-5, atol=1e-6)
    assert not np.array_equal(flat(p1), flat(load_run(sft_run)[1]))  # the step did move the parameters


def test_rollouts_carry_the_conditioning_prefix(sft_run):
    # A model trained with data.condition_prefix must see the same 'Sub Call Budget: n ' prefix in its
    # rollouts as in its training sequences, and the log-prob pass must see the sampled prompt's exact tokens.
    from apr_jax.data import tokenizer as tokenization
    from apr_jax.inference.evaluate import load_run_model
    from apr_jax.inference.runtime import Codec

    model_cfg, params, tok = load_run_model(sft_run)
    _, bos, eos = tokenization.special_ids(tok)
    codec = Codec(tok, bos, eos)
    cfg = dataclasses.replace(presets.load("tiny").rl, group_size=2)
    problem = {"id": 0, "nums": [3, 5, 7], "target": 22}
    loop = dataclasses.replace(LOOP, sub_call_budget=3)
    records = grpo.rollouts(model_cfg, params, codec, [problem], "apr", cfg, loop, 0, eos)
    assert len(records) == 2
    for r in records:
        parent = r["threads"][0]
        assert parent["prompt"].startswith("Sub Call Budget: 3 Moving to Node #0\n")
        assert parent["prompt_ids"] == [bos] + codec.ids(parent["prompt"])
    plain = grpo.rollouts(model_cfg, params, codec, [problem], "apr", cfg, LOOP, 0, eos)
    assert plain[0]["threads"][0]["prompt"].startswith("Moving to Node #0\n")


@pytest.mark.parametrize("tempered", [False, True])
def test_recorded_logprobs_are_those_the_objective_computes(sft_run, tempered):
    # Rollouts at temperature 0.5: the engine records the log-probs of the distribution the update trains
    # (the model at temperature 1 by default; the sampling distribution with tempered_logprobs), so the
    # first inner update's importance ratio is 1.
    from apr_jax.data import tokenizer as tokenization
    from apr_jax.inference.evaluate import load_run_model
    from apr_jax.inference.runtime import Codec

    model_cfg, params, tok = load_run_model(sft_run)
    _, bos, eos = tokenization.special_ids(tok)
    cfg = dataclasses.replace(presets.load("tiny").rl, group_size=2, temperature=0.5, tempered_logprobs=tempered)
    records = grpo.rollouts(model_cfg, params, Codec(tok, bos, eos), [{"id": 0, "nums": [3, 5, 7], "target": 22}],
                            "apr", cfg, LOOP, 0, eos)
    threads = [t for r in records for t in r["threads"] if t.get("token_ids")]
    assert threads
    for t in threads:
        tokens = np.asarray(t["prompt_ids"] + t["token_ids"], np.int32)[None]
        fresh = grpo._logprobs(model_cfg, params, tokens[:, :-1], tokens[:, 1:], cfg.logprob_temperature)[0]
        np.testing.assert_allclose(t["logprobs"], fresh[len(t["prompt_ids"]) - 1:], atol=1e-4)
        untempered = grpo._logprobs(model_cfg, params, tokens[:, :-1], tokens[:, 1:])[0]
        assert np.allclose(t["logprobs"], untempered[len(t["prompt_ids"]) - 1:], atol=1e-4) != tempered


def test_skip_uniform_groups_trains_only_on_groups_with_varied_rewards(sft_run, tmp_path, monkeypatch):
    group = presets.load("tiny").rl.group_size
    seen = []
    real = grpo.rollouts

    def record(*args, **kwargs):
        records = real(*args, **kwargs)
        for i, r in enumerate(records):
            r["correct"] = i == 0  # only the first group has two different rewards
        seen.extend(records)
        return records

    monkeypatch.setattr(grpo, "rollouts", record)
    last = run(sft_run, tmp_path / "skip", skip_uniform_groups=True)["last"]
    assert len(seen) > group and last["kept_rollouts"] == group
    first_group_sequences = sum(1 for r in seen[:group] for t in r["threads"] if t.get("token_ids"))
    assert last["sequences"] == first_group_sequences
    seen.clear()
    assert run(sft_run, tmp_path / "all", skip_uniform_groups=False)["last"]["kept_rollouts"] == len(seen)


def test_skip_uniform_groups_with_no_varied_group_makes_no_update(sft_run, tmp_path):
    summary = run(sft_run, tmp_path / "rl", skip_uniform_groups=True)  # the tiny model solves nothing
    assert summary["last"]["reward"] == 0.0
    assert summary["last"]["kept_rollouts"] == 0 and summary["last"]["sequences"] == 0
    _, before = load_run(sft_run)
    _, after = load_run(tmp_path / "rl")
    np.testing.assert_array_equal(flat(before), flat(after))


def test_saved_rollouts_hold_what_each_update_was_trained_on(sft_run, tmp_path, monkeypatch):
    real = grpo.rollouts

    def record(*args, **kwargs):
        records = real(*args, **kwargs)
        for i, r in enumerate(records):
            r["correct"] = i == 0  # only the first group has two different rewards
        return records

    monkeypatch.setattr(grpo, "rollouts", record)
    cfg = dataclasses.replace(presets.load("tiny").rl, steps=1, skip_uniform_groups=True)
    grpo.train(sft_run, tmp_path / "rl", cfg, dataclasses.replace(LOOP, save_rollouts=True), progress=False)
    from apr_jax.data.datasets import read_jsonl

    saved = list(read_jsonl(tmp_path / "rl" / "rollouts" / "step_00001.jsonl"))
    assert len(saved) == cfg.rollouts_per_step
    g = cfg.group_size
    assert [r["reward"] for r in saved[:g]] == [1.0] + [0.0] * (g - 1)
    std = np.sqrt((g - 1) / g ** 2)  # population std of one 1 and g - 1 zeros
    np.testing.assert_allclose([r["advantage"] for r in saved[:g]],
                               [(1 - 1 / g) / std] + [-1 / g / std] * (g - 1), rtol=1e-5)
    assert [r["trained"] for r in saved] == [True] * g + [False] * (len(saved) - g)
    assert all(r["choice"] in ("spawn", "serial", "join_marker") for r in saved)
    thread = saved[0]["threads"][0]
    assert "output" in thread and not {"token_ids", "prompt_ids", "logprobs"} & set(thread)
