"""GRPO maths (apr_jax.rl): hand-computed advantages, surrogate, k3, aggregation, gradient direction,
rollout records -> sequences -> padded batches, and the configuration."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apr_jax.rl import (
    GRPOConfig,
    aggregate,
    bucket_width,
    clipped_surrogate,
    group_advantages,
    grpo_loss,
    importance_ratio,
    informative_rollouts,
    k3_kl,
    pad_batch,
    reward,
    rollout_sequences,
    choice_credit,
    parent_choice,
    token_aggregate,
    token_logprobs,
)

# ------------------------------------------------------------------------------------ advantages


def test_group_advantages_hand_values():
    rewards_B = jnp.array([1, 0, 0, 1, 1, 0, 0, 0, 0, 0], jnp.float32)
    adv_B = np.asarray(jax.jit(group_advantages, static_argnums=1)(rewards_B, 5))
    std = math.sqrt(0.24)  # population std of [1, 0, 0, 1, 1]: mean 0.6, var (3 * 0.16 + 2 * 0.36) / 5
    np.testing.assert_allclose(adv_B[:5], [0.4 / std, -0.6 / std, -0.6 / std, 0.4 / std, 0.4 / std], rtol=1e-6)
    np.testing.assert_allclose(adv_B[:5], [0.8164966, -1.2247449, -1.2247449, 0.8164966, 0.8164966], rtol=1e-6)
    assert np.all(adv_B[5:] == 0.0) and np.all(np.isfinite(adv_B))
    assert adv_B.dtype == np.float32


def test_group_advantages_eps_and_shape_check():
    adv_B = group_advantages(jnp.array([1.0, 0.0]), 2, eps=1.0)  # std 0.5 -> (+-0.5) / 1.5
    np.testing.assert_allclose(np.asarray(adv_B), [1 / 3, -1 / 3], rtol=1e-6)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(jnp.zeros(7), 5)


def test_informative_rollouts_marks_groups_with_two_different_rewards():
    mask = informative_rollouts([0, 0, 1, 0, 1, 1, 0.5, 0.5], 2)
    np.testing.assert_array_equal(mask, [False, False, True, True, False, False, False, False])
    assert informative_rollouts([0.0, 0.0, 0.0], 3).tolist() == [False] * 3


def test_reward_definition():
    assert reward(True, 5000, 7, GRPOConfig()) == 1.0
    assert reward(False, 5000, 7, GRPOConfig()) == 0.0
    cfg = GRPOConfig(sequential_token_penalty=0.1, children_penalty=0.05)
    assert reward(True, 2000, 3, cfg) == pytest.approx(1.0 - 0.2 - 0.15)

def test_choice_credit_signs_the_push_on_each_choice_of_the_parent():
    # Group 0 mixed: spawners rewarded 1, 0; serial 1, 1 -> mean 0.75, std sqrt(0.1875), spawners' mean
    # advantage (0.25 - 0.75) / 2 / std < 0. Group 1: all spawn (not mixed). Group 2: mixed, equal rewards.
    choices = ["spawn", "spawn", "serial", "serial"] + ["spawn"] * 4 + ["join_marker", "serial", "serial", "spawn"]
    rewards = np.array([1, 0, 1, 1, 0, 1, 0, 1, 0, 0, 0, 0], np.float32)
    adv = np.asarray(group_advantages(jnp.asarray(rewards), 4))
    out = choice_credit(choices, rewards, adv, 4)
    std = math.sqrt(0.1875)
    assert out["mixed_groups"] == 1
    assert (out["spawn_share"], out["serial_share"], out["join_marker_share"]) == (7 / 12, 4 / 12, 1 / 12)
    assert out["spawn_reward"] == pytest.approx(3 / 7) and out["serial_reward"] == pytest.approx(2 / 4)
    assert out["join_marker_reward"] == 0.0 and "join_marker_advantage" not in out  # only in an unmixed group
    assert out["spawn_advantage"] == pytest.approx((0.25 - 0.75) / 2 / std, rel=1e-5)
    assert out["serial_advantage"] == pytest.approx(0.25 / std, rel=1e-5)
    assert choice_credit(["serial"] * 2, [1.0, 0.0], [1.0, -1.0], 2) == {
        "mixed_groups": 0, "spawn_share": 0.0, "serial_share": 1.0, "serial_reward": 0.5, "join_marker_share": 0.0}


def test_parent_choice_reads_the_rollout_record():
    assert parent_choice({"children": 2, "threads": []}) == "spawn"
    assert parent_choice({"children": 0, "threads": [{"role": "parent", "stop": "join_marker"}]}) == "join_marker"
    assert parent_choice({"children": 0, "threads": [{"role": "parent", "stop": "eos"}]}) == "serial"
    assert parent_choice({"children": 0, "threads": [{"role": "sample", "stop": "join_marker"}]}) == "serial"


# ------------------------------------------------------------------------------------ per-token terms


def test_clipped_surrogate_hand_values():
    ratio_BT = jnp.array([[1.5, 0.5], [1.5, 0.5]], jnp.float32)
    adv_B = jnp.array([1.0, -1.0], jnp.float32)
    np.testing.assert_allclose(np.asarray(clipped_surrogate(ratio_BT, adv_B, 0.2)), [[-1.2, -0.5], [1.5, 0.8]],
                               rtol=1e-6)


def test_clip_fraction_and_ratio_mean():
    ratio_BT = jnp.array([[1.5, 0.5], [1.5, 0.5]], jnp.float32)
    logp_BT = jnp.log(ratio_BT)
    zeros_BT = jnp.zeros_like(logp_BT)
    mask_BT = jnp.ones((2, 2), jnp.bool_)
    loss, m = grpo_loss(logp_BT, zeros_BT, logp_BT, jnp.array([1.0, -1.0]), mask_BT, jnp.array([0, 1]), 2,
                        0.2, 0.0)
    assert float(m["clip_fraction"]) == pytest.approx(0.5)  # (1.5, A=+1) and (0.5, A=-1) are clipped
    assert float(m["ratio_mean"]) == pytest.approx(1.0)
    assert float(m["kl"]) == pytest.approx(0.0, abs=1e-7)
    # per-sequence means (-1.2 - 0.5) / 2 and (1.5 + 0.8) / 2, one sequence per rollout, 2 rollouts
    assert float(loss) == pytest.approx(((-1.7 / 2) + (2.3 / 2)) / 2, rel=1e-6)
    assert float(m["surrogate"]) == pytest.approx(float(loss))


def test_importance_ratio():
    np.testing.assert_allclose(np.asarray(importance_ratio(jnp.array([[-1.0]]), jnp.array([[-1.5]]))),
                               [[math.exp(0.5)]], rtol=1e-6)


def test_k3_kl():
    lp_BT = jnp.array([[-1.0, -2.0, -0.5]], jnp.float32)
    assert np.all(np.asarray(k3_kl(lp_BT, lp_BT)) == 0.0)
    ref_BT = lp_BT - 0.1  # lp - ref = 0.1: exp(-0.1) + 0.1 - 1
    np.testing.assert_allclose(np.asarray(k3_kl(lp_BT, ref_BT)), np.full((1, 3), 0.0048374180), rtol=1e-4)
    others_BT = jnp.array([[-3.0, 0.0, -0.4]], jnp.float32)
    assert np.all(np.asarray(k3_kl(lp_BT, others_BT)) > 0.0)


def test_token_logprobs_matches_numpy():
    logits_BTV = jax.random.normal(jax.random.key(0), (2, 3, 5), jnp.bfloat16)
    targets_BT = jnp.array([[0, 4, 2], [1, 1, 3]], jnp.int32)
    got_BT = token_logprobs(logits_BTV, targets_BT)
    x = np.asarray(logits_BTV, np.float64)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    want = np.take_along_axis(logp, np.asarray(targets_BT)[..., None], -1)[..., 0]
    assert got_BT.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got_BT), want, rtol=1e-5, atol=1e-6)

# ------------------------------------------------------------------------------------ aggregation


def _agg_batch():
    per_token_BT = jnp.array([[1, 2, 3, 4], [10, 20, 30, 40], [5, 7, 100, 100], [1000, 1000, 1000, 1000]],
                             jnp.float32)
    mask_BT = jnp.array([[1, 1, 0, 0], [0, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]], jnp.bool_)
    rollout_B = jnp.array([0, 0, 1, -1], jnp.int32)
    return per_token_BT, mask_BT, rollout_B


def test_aggregate_hand_value():
    per_token_BT, mask_BT, rollout_B = _agg_batch()
    # rollout 0: (mean(1, 2) + mean(20, 30, 40)) / 2 = (1.5 + 30) / 2; rollout 1: mean(5, 7) = 6; padding ignored
    want = ((1.5 + 30.0) / 2 + 6.0) / 2
    assert float(jax.jit(aggregate)(per_token_BT, mask_BT, rollout_B, 2)) == pytest.approx(want)
    assert want == 10.875


def test_token_aggregate_weighs_every_loss_token_alike():
    per_token_BT, mask_BT, rollout_B = _agg_batch()
    # masked tokens of valid rows: 1, 2 | 20, 30, 40 | 5, 7 (7 tokens); padding row ignored
    assert float(jax.jit(token_aggregate)(per_token_BT, mask_BT, rollout_B, 7)) == pytest.approx(105 / 7)
    halves = [token_aggregate(per_token_BT[s], mask_BT[s], rollout_B[s], 7) for s in (slice(0, 1), slice(1, 4))]
    assert float(sum(halves)) == pytest.approx(105 / 7)
    ones_BT = jnp.ones((4, 4), jnp.float32)
    adv_B = jnp.array([1.0, 1.0, -1.0, 0.0])
    tree, _ = grpo_loss(ones_BT * 0, ones_BT * 0, ones_BT * 0, adv_B, mask_BT, rollout_B, 2, 0.2, 0.0)
    token, _ = grpo_loss(ones_BT * 0, ones_BT * 0, ones_BT * 0, adv_B, mask_BT, rollout_B, 7, 0.2, 0.0,
                         aggregation="token")
    # ratio 1: per-token loss -A. tree: ((-1 - 1) / 2 + 1) / 2 = 0; token: (-5 + 2) / 7
    assert float(tree) == pytest.approx(0.0) and float(token) == pytest.approx(-3 / 7)
    with pytest.raises(ValueError, match="aggregation"):
        grpo_loss(ones_BT, ones_BT, ones_BT, adv_B, mask_BT, rollout_B, 2, 0.2, 0.0, aggregation="seq")


def test_aggregate_empty_mask_row_counts_but_adds_zero():
    per_token_BT = jnp.array([[4.0, 6.0], [jnp.inf, 1.0]], jnp.float32)
    mask_BT = jnp.array([[1, 1], [0, 0]], jnp.bool_)
    loss = aggregate(per_token_BT, mask_BT, jnp.array([0, 0]), 1)
    assert float(loss) == pytest.approx(5.0 / 2)


def test_aggregate_micro_batches_sum_to_full_batch_with_rollout_sizes():
    per_token_BT, mask_BT, rollout_B = _agg_batch()
    full = aggregate(per_token_BT, mask_BT, rollout_B, 2)
    sizes_B = jnp.array([2, 2, 1, 0], jnp.int32)
    halves = [aggregate(per_token_BT[s], mask_BT[s], rollout_B[s], 2, sizes_B[s])
              for s in (slice(0, 1), slice(1, 4))]
    assert float(sum(halves)) == pytest.approx(float(full))
    wrong = aggregate(per_token_BT[:1], mask_BT[:1], rollout_B[:1], 2)  # counted in the batch: 1 sequence
    assert float(wrong) != pytest.approx(float(halves[0]))

# ------------------------------------------------------------------------------------ gradients


def _toy(theta_TV, targets_BT):
    logits_BTV = jnp.broadcast_to(theta_TV, (targets_BT.shape[0], *theta_TV.shape))
    return token_logprobs(logits_BTV, targets_BT)


def _toy_loss(theta_TV, targets_BT, adv_B, ref_BT, beta):
    logp_BT = _toy(theta_TV, targets_BT)
    mask_BT = jnp.ones(targets_BT.shape, jnp.bool_)
    loss, _ = grpo_loss(logp_BT, jax.lax.stop_gradient(logp_BT), ref_BT, adv_B, mask_BT,
                        jnp.arange(targets_BT.shape[0], dtype=jnp.int32), targets_BT.shape[0], 0.2, beta)
    return loss


def test_sgd_step_raises_rewarded_and_lowers_unrewarded_tokens():
    theta_TV = jax.random.normal(jax.random.key(1), (3, 4), jnp.float32)
    targets_BT = jnp.array([[0, 1, 2], [3, 3, 3]], jnp.int32)
    adv_B = group_advantages(jnp.array([1.0, 0.0]), 2)  # [+1, -1]
    ref_BT = _toy(theta_TV, targets_BT)
    grad_TV = jax.grad(_toy_loss)(theta_TV, targets_BT, adv_B, ref_BT, 0.0)
    before_BT, after_BT = _toy(theta_TV, targets_BT), _toy(theta_TV - 0.5 * grad_TV, targets_BT)
    assert np.all(np.asarray(after_BT[0] > before_BT[0]))
    assert np.all(np.asarray(after_BT[1] < before_BT[1]))


def test_equal_rewards_only_kl_gives_gradient():
    theta_TV = jax.random.normal(jax.random.key(2), (3, 4), jnp.float32)
    targets_BT = jnp.array([[0, 1, 2], [3, 3, 3]], jnp.int32)
    adv_B = group_advantages(jnp.array([1.0, 1.0]), 2)
    assert np.all(np.asarray(adv_B) == 0.0)
    ref_BT = _toy(theta_TV, targets_BT) - jnp.array([[0.3, -0.2, 0.1], [0.5, 0.0, -0.4]])
    surrogate_grad_TV = jax.grad(_toy_loss)(theta_TV, targets_BT, adv_B, ref_BT, 0.0)
    assert np.all(np.asarray(surrogate_grad_TV) == 0.0)
    beta = 0.1
    grad_TV = jax.grad(_toy_loss)(theta_TV, targets_BT, adv_B, ref_BT, beta)
    assert np.abs(np.asarray(grad_TV)).max() > 1e-4

    def kl_only(theta):
        logp_BT = _toy(theta, targets_BT)
        return aggregate(k3_kl(logp_BT, ref_BT), jnp.ones((2, 3), jnp.bool_), jnp.array([0, 1]), 2)

    np.testing.assert_allclose(np.asarray(grad_TV), beta * np.asarray(jax.grad(kl_only)(theta_TV)), rtol=1e-5,
                               atol=1e-8)


def test_padding_log_probs_cannot_produce_nan():
    logp_BT = jnp.array([[-0.5, -1e4], [-1e4, -1e4]], jnp.float32)
    mask_BT = jnp.array([[1, 0], [0, 0]], jnp.bool_)

    def loss_fn(lp_BT):
        return grpo_loss(lp_BT, jnp.zeros_like(lp_BT), jnp.zeros_like(lp_BT), jnp.array([1.0, 0.0]), mask_BT,
                         jnp.array([0, -1]), 1, 0.2, 0.01)[0]

    loss, grad_BT = jax.value_and_grad(loss_fn)(logp_BT)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad_BT)))
    assert np.all(np.asarray(grad_BT)[~np.asarray(mask_BT)] == 0.0)

# ------------------------------------------------------------------------------------ sequences


def _record(correct, threads):
    return {"correct": correct, "sequential_tokens": 20, "children": 2, "threads": threads}


def _fake_records():
    bos, eos = 1, 2
    p0 = {"role": "parent", "path": "p0", "stop": "spawn", "prompt_ids": [bos, 10, 11, 12],
          "token_ids": [20, 21, 22], "logprobs": [-0.1, -0.2, -0.3]}
    c0 = {"role": "child", "path": "p0.c0", "stop": "eos", "prompt_ids": [bos, 30, 31],
          "token_ids": [40, 41, eos], "logprobs": [-0.4, -0.5, -0.6]}
    c1 = {"role": "child", "path": "p0.c1", "stop": "not_run"}
    p1 = {"role": "parent", "path": "p1", "stop": "eos", "prompt_ids": [bos, 10, 11, 12, 20, 21, 22, 50, 51],
          "token_ids": [60, eos], "logprobs": [-0.7, -0.8]}
    other = {"role": "parent", "path": "p0", "stop": "eos", "prompt_ids": [bos, 13], "token_ids": [eos],
             "logprobs": [-0.9]}
    return [_record(True, [p0, c0, c1, p1]), _record(False, [other])]


def test_rollout_sequences_tokens_masks_and_shared_advantage():
    records = _fake_records()
    seqs = rollout_sequences(records, [0.5, -2.0], first_rollout_index=3)
    assert [s.path for s in seqs] == ["p0", "p0.c0", "p1", "p0"]
    assert [s.rollout for s in seqs] == [3, 3, 3, 4]
    assert [s.rollout_size for s in seqs] == [3, 3, 3, 1]
    assert [s.advantage for s in seqs] == [0.5, 0.5, 0.5, -2.0]
    ran = [t for r in records for t in r["threads"] if t.get("token_ids")]
    for seq, thread in zip(seqs, ran):
        assert seq.tokens.dtype == np.int32 and seq.loss_mask.dtype == np.bool_
        assert seq.old_logprobs.dtype == np.float32
        assert seq.tokens.tolist() == thread["prompt_ids"] + thread["token_ids"]
        assert seq.tokens[0] == 1 and np.count_nonzero(seq.tokens == 1) == 1  # BOS once, not re-added
        assert len(seq.loss_mask) == len(seq.old_logprobs) == len(seq.targets) == len(seq.tokens) - 1
        n_prompt = len(thread["prompt_ids"])
        assert not seq.loss_mask[: n_prompt - 1].any() and seq.loss_mask[n_prompt - 1:].all()
        assert seq.targets[seq.loss_mask].tolist() == thread["token_ids"]
        np.testing.assert_allclose(seq.old_logprobs[seq.loss_mask], thread["logprobs"], rtol=1e-6)
        assert np.all(seq.old_logprobs[~seq.loss_mask] == 0.0)
    assert seqs[0].loss_mask.tolist() == [False, False, False, True, True, True]


def test_rollout_sequences_can_drop_children_and_keep_the_tree_weights():
    seqs = rollout_sequences(_fake_records(), [0.5, -2.0], drop_roles=("child",))
    assert [s.path for s in seqs] == ["p0", "p1", "p0"]
    assert [s.rollout_size for s in seqs] == [3, 3, 1]  # the tree still counts its child


def test_tokens_forced_by_a_decoding_aid_carry_no_loss():
    records = _fake_records()
    child = records[0]["threads"][1]
    child.update(forced=[1], logprobs=[-0.4, 0.0, -0.6])
    seq = rollout_sequences(records, [0.5, -2.0])[1]
    assert seq.loss_mask.tolist() == [False, False, True, False, True]
    assert seq.targets[seq.loss_mask].tolist() == [40, 2]
    np.testing.assert_allclose(seq.old_logprobs[seq.loss_mask], [-0.4, -0.6], rtol=1e-6)


def test_rollout_sequences_errors():
    records = _fake_records()
    with pytest.raises(ValueError, match="advantages"):
        rollout_sequences(records, [0.5])
    bad = _record(True, [{"role": "parent", "path": "p0", "prompt_ids": [1], "token_ids": [5, 6],
                          "logprobs": [-1.0]}])
    with pytest.raises(ValueError, match="p0"):
        rollout_sequences([bad], [0.0])


def test_pad_batch_shapes_padding_and_errors():
    seqs = rollout_sequences(_fake_records(), [0.5, -2.0], first_rollout_index=3)
    batch = pad_batch(seqs, batch_rows=6, width=12, pad_id=99)
    for key in ("inputs_BT", "targets_BT", "mask_BT", "old_logp_BT"):
        assert batch[key].shape == (6, 12)
    assert batch["inputs_BT"].dtype == np.int32 and batch["mask_BT"].dtype == np.bool_
    assert batch["old_logp_BT"].dtype == np.float32 and batch["adv_B"].dtype == np.float32
    assert batch["rollout_B"].tolist() == [3, 3, 3, 4, -1, -1]
    assert batch["rollout_size_B"].tolist() == [3, 3, 3, 1, 0, 0]
    np.testing.assert_allclose(batch["adv_B"], [0.5, 0.5, 0.5, -2.0, 0.0, 0.0])
    p1 = seqs[2]  # 11 tokens -> 10 input positions
    assert batch["inputs_BT"][2].tolist() == p1.tokens[:-1].tolist() + [99, 99]
    assert batch["targets_BT"][2].tolist() == p1.tokens[1:].tolist() + [99, 99]
    assert batch["mask_BT"].sum(axis=1).tolist() == [3, 3, 2, 1, 0, 0]
    assert np.all(batch["inputs_BT"][4:] == 99) and not batch["mask_BT"][4:].any()
    with pytest.raises(ValueError, match=r"'p1'.*11 tokens"):
        pad_batch(seqs, batch_rows=6, width=9)
    pad_batch(seqs, batch_rows=4, width=10)  # width + 1 == longest sequence fits
    with pytest.raises(ValueError, match="4 sequences"):
        pad_batch(seqs, batch_rows=3, width=12)


def test_padded_batch_loss_end_to_end():
    seqs = rollout_sequences(_fake_records(), [0.5, -2.0])
    b = {k: jnp.asarray(v) for k, v in pad_batch(seqs, batch_rows=6, width=16).items()}
    loss, m = jax.jit(grpo_loss)(b["old_logp_BT"], b["old_logp_BT"], b["old_logp_BT"], b["adv_B"], b["mask_BT"],
                                 b["rollout_B"], 2, 0.2, 0.001)
    # ratio 1 everywhere: each sequence's token-mean loss is -A; rollout 0 sums 3 * (-0.5 / 3), rollout 1 is +2
    assert float(loss) == pytest.approx((-0.5 + 2.0) / 2, rel=1e-6)
    assert float(m["kl"]) == 0.0 and float(m["clip_fraction"]) == 0.0


def test_bucket_width():
    assert [bucket_width(n) for n in (1, 64, 65, 128, 200, 513)] == [64, 64, 128, 128, 256, 1024]
    assert bucket_width(200, quantum=48) == 384
    assert bucket_width(200, cap=150) == 150
    with pytest.raises(ValueError, match="quantum"):
        bucket_width(10, quantum=0)

# ------------------------------------------------------------------------------------ config


def test_config_defaults_are_the_papers():
    cfg = GRPOConfig()
    assert (cfg.group_size, cfg.problems_per_step, cfg.temperature, cfg.learning_rate) == (5, 64, 1.0, 1e-5)
    assert (cfg.clip_epsilon, cfg.kl_beta, cfg.steps, cfg.inner_updates) == (0.2, 0.001, 150, 2)
    assert (cfg.grad_clip, cfg.adv_eps, cfg.seed) == (1.0, 1e-10, 0)
    assert (cfg.sequential_token_penalty, cfg.children_penalty) == (0.0, 0.0)
    assert cfg.rollouts_per_step == 320
    assert (cfg.tempered_logprobs, cfg.train_children, cfg.logprob_temperature) == (False, True, 1.0)
    assert GRPOConfig(temperature=0.5).logprob_temperature == 1.0
    assert GRPOConfig(temperature=0.5, tempered_logprobs=True).logprob_temperature == 0.5
    assert GRPOConfig.for_method("apr") == cfg
    assert GRPOConfig.for_method("sosp").kl_beta == 0.01
    assert GRPOConfig.for_method("sosp", steps=3).steps == 3
    assert hash(cfg) == hash(GRPOConfig())
    with pytest.raises(ValueError, match="method"):
        GRPOConfig.for_method("sc")


@pytest.mark.parametrize("field,value", [
    ("group_size", 1), ("group_size", 2.0), ("problems_per_step", 0), ("temperature", 0.0),
    ("learning_rate", 0.0), ("learning_rate", float("nan")), ("clip_epsilon", 0.0), ("clip_epsilon", 1.0),
    ("kl_beta", -0.1), ("steps", 0), ("inner_updates", 0), ("grad_clip", -1.0), ("adv_eps", 0.0),
    ("seed", -1), ("sequential_token_penalty", -0.1), ("children_penalty", -1.0),
    ("aggregation", "sequence"), ("skip_uniform_groups", 1), ("tempered_logprobs", "yes"), ("train_children", None),
])
def test_config_rejects_invalid_values(field, value):
    with pytest.raises(ValueError, match=f"GRPOConfig.{field}"):
        GRPOConfig(**{field: value})
