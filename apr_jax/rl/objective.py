"""The GRPO objective through whole APR thread trees (Pan et al. 2025, arXiv 2504.15466, Sec. 4).

Every sequence (row) of a batch is one language-model call of a rollout: a parent call, a parent
continuation after a join, or a child thread. All sequences of a rollout share the rollout's group-normalised
advantage. Per token, the loss is the PPO clipped surrogate plus ``beta`` times the k3 KL estimate against
the frozen SFT reference; only sampled tokens count (``mask_BT``). The per-token loss is averaged within each
sequence, divided by the number of sequences of its rollout, summed over sequences and divided by the number
of rollouts (:func:`aggregate`), so every rollout weighs the same however many threads it spawned.

All array functions are pure ``jax.numpy``, jit-compatible and free of Python control flow on traced values.
Shape suffixes: ``B`` batch rows (sequences), ``T`` tokens, ``V`` vocabulary, ``G`` group members.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from apr_jax.rl.config import GRPOConfig


def group_advantages(rewards_B: jax.Array, group_size: int, eps: float = 1e-10) -> jax.Array:
    """``(r - mean_g) / (std_g + eps)`` within each group of ``group_size`` contiguous rollouts.

    ``std_g`` is the population standard deviation (ddof 0). A group whose rewards are all equal gets
    advantage 0 for every member. ``len(rewards_B)`` must be a multiple of ``group_size``.
    """
    if rewards_B.shape[0] % group_size:
        raise ValueError(f"group_advantages: {rewards_B.shape[0]} rewards are not a multiple of "
                         f"group_size {group_size}")
    rewards_PG = rewards_B.astype(jnp.float32).reshape(-1, group_size)
    mean_P1 = rewards_PG.mean(axis=1, keepdims=True)
    std_P1 = rewards_PG.std(axis=1, keepdims=True)
    return ((rewards_PG - mean_P1) / (std_P1 + eps)).reshape(-1)


def informative_rollouts(rewards_B, group_size: int) -> np.ndarray:
    """Boolean mask over rollouts: True where the rollout's group holds at least two different rewards.

    A group whose rewards are all equal has advantage 0 for every member (:func:`group_advantages`), so
    its trees add only the KL term to an update; ``GRPOConfig.skip_uniform_groups`` drops them.
    """
    rewards_PG = np.asarray(rewards_B, np.float32).reshape(-1, group_size)
    varied_P = rewards_PG.max(axis=1) > rewards_PG.min(axis=1)
    return np.repeat(varied_P, group_size)


PARENT_CHOICES = ("spawn", "serial", "join_marker")


def parent_choice(record: dict) -> str:
    """What an APR rollout's parent did where it could spawn: ``"spawn"`` (children ran),
    ``"join_marker"`` (it wrote the join marker ``<Sub Searches>`` itself, inventing its children's results:
    the rollout ends unsolved) or ``"serial"`` (neither: it searched on alone). SoS+ rollouts are serial."""
    if record.get("children", 0) > 0:
        return "spawn"
    if any(t.get("role") == "parent" and t.get("stop") == "join_marker" for t in record.get("threads", ())):
        return "join_marker"
    return "serial"


def choice_credit(choices_B, rewards_B, adv_B, group_size: int) -> dict[str, float]:
    """How a step's advantages credit each choice of the parent (:func:`parent_choice`).

    For one decision made by a softmax over options, the policy-gradient term on option ``c``'s logit is
    ``sum_i A_i * (1[a_i == c] - p_c)``; the advantages of a group sum to zero, so this is the summed
    advantage of the group's rollouts that chose ``c``: > 0 raises ``c``, < 0 lowers it. The aggregation's
    per-sequence weights (a tree of a parent and ``k`` children weighs each of its sequences ``1 / (k + 1)``,
    a sequence's tokens ``1 / length``) scale each rollout's term and can tilt the sum only where rollouts of
    one group carry very different weights (docs/rl.md, "Why GRPO stops spawning").

    Returns, for each choice ``c`` that occurs (keys of an undefined value are left out):
      ``{c}_share``: share of rollouts that made it; ``{c}_reward``: their mean reward;
      ``{c}_advantage``: mean advantage of the rollouts that made it, within the mixed groups;
      and ``mixed_groups``: groups holding more than one choice whose rewards differ (those that move the
      choice).
    """
    choices_PG = np.asarray(choices_B, dtype=object).reshape(-1, group_size)
    rewards_PG = np.asarray(rewards_B, np.float64).reshape(choices_PG.shape)
    adv_PG = np.asarray(adv_B, np.float64).reshape(choices_PG.shape)
    mixed_P = (np.array([len(set(row)) > 1 for row in choices_PG], bool)
               & (rewards_PG.max(axis=1) > rewards_PG.min(axis=1)))
    out: dict[str, float] = {"mixed_groups": int(mixed_P.sum())}
    for c in PARENT_CHOICES:
        made_PG = choices_PG == c
        out[f"{c}_share"] = float(made_PG.mean())
        if made_PG.any():
            out[f"{c}_reward"] = float(rewards_PG[made_PG].mean())
        if made_PG[mixed_P].any():
            out[f"{c}_advantage"] = float(adv_PG[mixed_P][made_PG[mixed_P]].mean())
    return out


def reward(verified: bool, sequential_tokens: int, children: int, cfg: GRPOConfig) -> float:
    """``verified - sequential_token_penalty * (sequential_tokens / 1000) - children_penalty * children``.

    ``verified`` is whether the final parent answer verifies; with the default (zero) penalties the
    reward is the paper's binary 1 / 0.
    """
    return (float(verified) - cfg.sequential_token_penalty * (sequential_tokens / 1000.0)
            - cfg.children_penalty * children)


def importance_ratio(logp_BT: jax.Array, old_logp_BT: jax.Array) -> jax.Array:
    """``exp(logp - old_logp)``: the policy ratio of each token against the sampling policy."""
    return jnp.exp(logp_BT.astype(jnp.float32) - old_logp_BT.astype(jnp.float32))


def clipped_surrogate(ratio_BT: jax.Array, adv_B: jax.Array, eps: float) -> jax.Array:
    """Per-token PPO loss ``-min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)``, ``A`` broadcast over T."""
    adv_B1 = adv_B.astype(jnp.float32)[:, None]
    unclipped_BT = ratio_BT * adv_B1
    clipped_BT = jnp.clip(ratio_BT, 1.0 - eps, 1.0 + eps) * adv_B1
    return -jnp.minimum(unclipped_BT, clipped_BT)


def clip_active(ratio_BT: jax.Array, adv_B: jax.Array, eps: float) -> jax.Array:
    """Bool per token: the clipped term is the one selected by the min and differs from the unclipped one.

    That is ``A > 0`` with ``ratio > 1 + eps``, or ``A < 0`` with ``ratio < 1 - eps`` (no gradient flows).
    """
    adv_B1 = adv_B.astype(jnp.float32)[:, None]
    return jnp.clip(ratio_BT, 1.0 - eps, 1.0 + eps) * adv_B1 < ratio_BT * adv_B1


def k3_kl(logp_BT: jax.Array, ref_logp_BT: jax.Array) -> jax.Array:
    """Per-token k3 KL estimate ``exp(ref - lp) - (ref - lp) - 1`` (>= 0, zero iff ``lp == ref``)."""
    log_ratio_BT = ref_logp_BT.astype(jnp.float32) - logp_BT.astype(jnp.float32)
    return jnp.exp(log_ratio_BT) - log_ratio_BT - 1.0


def rollout_sizes(rollout_B: jax.Array) -> jax.Array:
    """Number of rows of the batch in each row's rollout (0 for padding rows, ``rollout_B == -1``)."""
    valid_B = rollout_B >= 0
    same_BB = (rollout_B[:, None] == rollout_B[None, :]) & valid_B[None, :]
    return jnp.where(valid_B, same_BB.sum(axis=1), 0).astype(jnp.int32)


def masked_mean(x_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """Mean of ``x_BT`` over the True entries of ``mask_BT`` (0 when the mask is empty)."""
    return jnp.where(mask_BT, x_BT, 0.0).sum() / jnp.maximum(mask_BT.sum().astype(jnp.float32), 1.0)


def aggregate(per_token_BT: jax.Array, mask_BT: jax.Array, rollout_B: jax.Array,
              num_rollouts: int | jax.Array, rollout_size_B: jax.Array | None = None) -> jax.Array:
    """``sum_i mean_t(loss_it over mask) / n_rollout(i) / num_rollouts`` over valid rows ``i``.

    Args:
      per_token_BT: per-token loss.
      mask_BT: True on the tokens that carry loss (sampled tokens).
      rollout_B: rollout index of each row in ``[0, num_rollouts)``; ``-1`` marks a padding row, which
        is ignored entirely.
      num_rollouts: number of rollouts the loss is averaged over (a Python or traced number).
      rollout_size_B: number of sequences of each row's rollout. ``None`` counts the rows of that rollout
        present in this batch; pass the full counts when a rollout's sequences are split over several
        micro-batches, so that the micro-batch losses sum to the loss of the whole step.

    A valid row whose mask is empty contributes 0 (no NaN).
    """
    per_token_BT = jnp.where(mask_BT, per_token_BT, 0.0)
    seq_mean_B = per_token_BT.sum(axis=1) / jnp.maximum(mask_BT.sum(axis=1).astype(jnp.float32), 1.0)
    sizes_B = rollout_sizes(rollout_B) if rollout_size_B is None else rollout_size_B
    weight_B = jnp.where(rollout_B >= 0, 1.0 / jnp.maximum(sizes_B.astype(jnp.float32), 1.0), 0.0)
    return (seq_mean_B * weight_B).sum() / num_rollouts


def token_aggregate(per_token_BT: jax.Array, mask_BT: jax.Array, rollout_B: jax.Array,
                    num_tokens: int | jax.Array) -> jax.Array:
    """``sum of loss over the masked tokens of valid rows / num_tokens``: every loss token of a step weighs
    the same, whatever its sequence's length or its tree's size (DAPO's token-level loss, Yu et al. 2025,
    arXiv 2503.14476). ``num_tokens`` is the step's number of loss tokens, so micro-batches add up."""
    valid_BT = mask_BT.astype(jnp.bool_) & (rollout_B >= 0)[:, None]
    return jnp.where(valid_BT, per_token_BT, 0.0).sum() / num_tokens


def grpo_loss(logp_BT: jax.Array, old_logp_BT: jax.Array, ref_logp_BT: jax.Array, adv_B: jax.Array,
              mask_BT: jax.Array, rollout_B: jax.Array, num_rollouts: int | jax.Array, clip_epsilon: float,
              kl_beta: float, rollout_size_B: jax.Array | None = None,
              aggregation: str = "tree") -> tuple[jax.Array, dict[str, jax.Array]]:
    """GRPO loss ``aggregate(clipped_surrogate + kl_beta * k3_kl)`` and its metrics.

    ``logp_BT`` are the current policy's log-probs of the targets (differentiated), ``old_logp_BT`` the
    sampling policy's and ``ref_logp_BT`` the frozen reference's. See :func:`aggregate` for ``rollout_B``,
    ``num_rollouts`` and ``rollout_size_B``. ``aggregation="token"`` uses :func:`token_aggregate` instead
    (``GRPOConfig.aggregation``); ``num_rollouts`` is then the step's number of loss tokens.

    Log-probs outside ``mask_BT`` are replaced by 0 before any exponential, so padding can produce
    neither an overflow nor a NaN gradient.

    Metrics: ``surrogate`` and ``kl`` (each aggregated like the loss, so ``loss = surrogate + beta * kl``),
    ``clip_fraction`` (fraction of masked tokens where the clip is active, :func:`clip_active`) and
    ``ratio_mean`` (mean importance ratio over masked tokens).
    """
    logp_BT, old_logp_BT, ref_logp_BT = (jnp.where(mask_BT, x_BT.astype(jnp.float32), 0.0)
                                         for x_BT in (logp_BT, old_logp_BT, ref_logp_BT))
    ratio_BT = importance_ratio(logp_BT, old_logp_BT)
    if aggregation == "tree":
        combine = functools.partial(aggregate, rollout_size_B=rollout_size_B)
    elif aggregation == "token":
        combine = token_aggregate
    else:
        raise ValueError(f"grpo_loss: aggregation must be 'tree' or 'token', got {aggregation!r}")
    surrogate = combine(clipped_surrogate(ratio_BT, adv_B, clip_epsilon), mask_BT, rollout_B, num_rollouts)
    kl = combine(k3_kl(logp_BT, ref_logp_BT), mask_BT, rollout_B, num_rollouts)
    token_mask_BT = mask_BT.astype(jnp.bool_) & (rollout_B >= 0)[:, None]
    metrics = {
        "surrogate": surrogate,
        "kl": kl,
        "clip_fraction": masked_mean(clip_active(ratio_BT, adv_B, clip_epsilon).astype(jnp.float32),
                                     token_mask_BT),
        "ratio_mean": masked_mean(ratio_BT, token_mask_BT),
    }
    return surrogate + kl_beta * kl, metrics


def token_logprobs(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """``log_softmax(logits)[b, t, targets[b, t]]`` in float32."""
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp_BTV, targets_BT[..., None].astype(jnp.int32), axis=-1)[..., 0]
