"""GRPO stage (Pan et al. 2025, arXiv 2504.15466, Sec. 4): configuration, the clipped-surrogate + k3 KL
objective aggregated over whole thread trees, and the conversion of rollout records into padded batches."""

from apr_jax.rl.config import GRPOConfig
from apr_jax.rl.objective import (
    PARENT_CHOICES,
    aggregate,
    choice_credit,
    clip_active,
    clipped_surrogate,
    group_advantages,
    grpo_loss,
    importance_ratio,
    informative_rollouts,
    k3_kl,
    masked_mean,
    parent_choice,
    reward,
    rollout_sizes,
    token_aggregate,
    token_logprobs,
)
from apr_jax.rl.sequences import Sequence, bucket_width, pad_batch, rollout_sequences

__all__ = [
    "GRPOConfig",
    "PARENT_CHOICES",
    "Sequence",
    "aggregate",
    "bucket_width",
    "choice_credit",
    "clip_active",
    "clipped_surrogate",
    "group_advantages",
    "grpo_loss",
    "importance_ratio",
    "informative_rollouts",
    "k3_kl",
    "masked_mean",
    "pad_batch",
    "parent_choice",
    "reward",
    "rollout_sequences",
    "rollout_sizes",
    "token_aggregate",
    "token_logprobs",
]
