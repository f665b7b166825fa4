"""GRPO configuration.

:class:`GRPOConfig` is a frozen, hashable dataclass (usable as a static ``jax.jit`` argument). Its defaults
are the GRPO recipe released with Adaptive Parallel Reasoning (Pan et al. 2025, arXiv 2504.15466, Sec. 4
and App. B): 64 problems per step, G = 5 rollouts per problem sampled at temperature 1.0, AdamW at a
constant 1e-5, PPO clip epsilon 0.2, 150 steps of 2 inner updates each, gradient clipping at 1.0, and a k3
KL penalty against the frozen SFT model with beta 0.001 (APR) or 0.01 (SoS+); see :meth:`for_method`.
"""

from __future__ import annotations

import dataclasses
import math

METHOD_KL_BETA = {"apr": 0.001, "sosp": 0.01}


def _int_at_least(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"GRPOConfig.{name} must be an int >= {low}, got {value!r}")


def _finite(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"GRPOConfig.{name} must be a finite number, got {value!r}")


def _positive(name: str, value) -> None:
    _finite(name, value)
    if value <= 0:
        raise ValueError(f"GRPOConfig.{name} must be > 0, got {value!r}")


def _non_negative(name: str, value) -> None:
    _finite(name, value)
    if value < 0:
        raise ValueError(f"GRPOConfig.{name} must be >= 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Hyper-parameters of one GRPO run (paper symbols in parentheses).

    Attributes:
      group_size: rollouts sampled per problem (G); advantages are normalised within each group.
      problems_per_step: problems drawn per RL step (so ``problems_per_step * group_size`` rollouts).
      temperature: sampling temperature of the rollouts (1.0: the policy's own distribution).
      learning_rate: constant AdamW learning rate.
      clip_epsilon: PPO clip range (epsilon); the ratio is clipped to ``[1 - epsilon, 1 + epsilon]``.
      kl_beta: weight (beta) of the k3 KL estimate against the frozen reference (SFT) model.
      steps: RL steps (rollout collection + updates).
      inner_updates: optimizer updates per step on the same rollouts; old log-probs are computed once
        per step (from the sampling model), so the first update has ratio 1.
      grad_clip: global gradient-norm clip; 0 disables clipping.
      adv_eps: epsilon added to the group standard deviation in the advantage denominator.
      seed: seeds problem sampling and rollouts.
      sequential_token_penalty: optional reward shaping (0 = off, the paper's setting).
      children_penalty: optional reward shaping (0 = off, the paper's setting).
      skip_uniform_groups: drop the trees of groups whose rewards are all equal before the update (off: the
        paper's objective). Their advantages are 0, so they would add only the KL term; the aggregation then
        divides by the kept rollouts, and their log-prob and gradient passes are saved: at a low success
        rate most groups are uniform. DAPO's dynamic-sampling filter (Yu et al. 2025) without resampling.
        A step with no varied group makes no update.
      tempered_logprobs: train the policy the rollouts are sampled from, ``softmax(logits / temperature)``:
        the engine records, and the update and the reference compute, log-probabilities of the tempered
        distribution (as verl does). Off (the default, and the paper's setting, where the temperature is
        1.0 and both are the same): log-probabilities of the model at temperature 1, so rollouts sampled at
        another temperature are off-policy for the objective.
      aggregation: how per-token losses add up. ``"tree"`` (the paper): each sequence's token mean, divided
        by the number of sequences of its tree, summed, divided by the number of rollouts, so a parent call's
        tokens weigh ``1 / (length * tree size)``. ``"token"`` (an ablation): every loss token of the step
        weighs the same (DAPO's token-level loss).
      train_children: children's sequences carry loss (the paper: the whole tree is trained). False (an
        ablation) trains only the parent calls; each still weighs ``1 / (sequences of its tree)``.

    The reward of a rollout is
    ``reward = verified - sequential_token_penalty * (sequential_tokens / 1000) - children_penalty * children``
    where ``verified`` is 1 if the final parent answer verifies, else 0; ``sequential_tokens`` is the
    rollout's critical-path token count and ``children`` the number of child threads it spawned.
    """

    group_size: int = 5
    problems_per_step: int = 64
    temperature: float = 1.0
    learning_rate: float = 1e-5
    clip_epsilon: float = 0.2
    kl_beta: float = 0.001
    steps: int = 150
    inner_updates: int = 2
    grad_clip: float = 1.0
    adv_eps: float = 1e-10
    seed: int = 0
    sequential_token_penalty: float = 0.0
    children_penalty: float = 0.0
    skip_uniform_groups: bool = False
    tempered_logprobs: bool = False
    aggregation: str = "tree"
    train_children: bool = True

    def __post_init__(self) -> None:
        _int_at_least("group_size", self.group_size, 2)
        _int_at_least("problems_per_step", self.problems_per_step, 1)
        _positive("temperature", self.temperature)
        _positive("learning_rate", self.learning_rate)
        _finite("clip_epsilon", self.clip_epsilon)
        if not 0 < self.clip_epsilon < 1:
            raise ValueError(f"GRPOConfig.clip_epsilon must be in (0, 1), got {self.clip_epsilon!r}")
        _non_negative("kl_beta", self.kl_beta)
        _int_at_least("steps", self.steps, 1)
        _int_at_least("inner_updates", self.inner_updates, 1)
        _non_negative("grad_clip", self.grad_clip)
        _positive("adv_eps", self.adv_eps)
        _int_at_least("seed", self.seed, 0)
        _non_negative("sequential_token_penalty", self.sequential_token_penalty)
        _non_negative("children_penalty", self.children_penalty)
        if self.aggregation not in ("tree", "token"):
            raise ValueError(f"GRPOConfig.aggregation must be 'tree' or 'token', got {self.aggregation!r}")
        for name in ("skip_uniform_groups", "tempered_logprobs", "train_children"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GRPOConfig.{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def logprob_temperature(self) -> float:
        """Temperature of the distribution whose log-probabilities the objective uses (1 unless tempered)."""
        return self.temperature if self.tempered_logprobs else 1.0

    @property
    def rollouts_per_step(self) -> int:
        """Rollouts per RL step: ``problems_per_step * group_size``."""
        return self.problems_per_step * self.group_size

    @classmethod
    def for_method(cls, method: str, **overrides) -> GRPOConfig:
        """The paper's recipe for ``method`` ("apr": beta 0.001, "sosp": beta 0.01), then ``overrides``."""
        if method not in METHOD_KL_BETA:
            raise ValueError(f"GRPOConfig.for_method: method must be one of {sorted(METHOD_KL_BETA)}, "
                             f"got {method!r}")
        return cls(**{"kl_beta": METHOD_KL_BETA[method], **overrides})
