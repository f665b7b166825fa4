"""Token sampling: small frozen configs and one pure function of (logits, per-thread keys, counters).

Every thread owns a PRNG key derived on the host from ``(seed, problem id, thread path)``
(:func:`thread_key`); the key of its ``i``-th generated token is ``fold_in(thread_key, i)``. A thread's
tokens therefore depend on nothing but its own key and logits: not on its slot, the number of slots or the
other threads decoded beside it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from apr_jax.countdown.problems import derive_seed


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen.

    Attributes:
      temperature: 0 for greedy (argmax); otherwise logits are divided by it before sampling.
      top_k: keep only the ``top_k`` most likely tokens before sampling (0 = the whole vocabulary).
      logprob_temperature: the recorded log-probabilities are those of ``softmax(logits /
        logprob_temperature)``: 1 (the default) records the model's own distribution; a GRPO run that trains
        the policy it samples from records the sampling distribution (``logprob_temperature ==
        temperature``, see ``GRPOConfig.tempered_logprobs``). Top-k is never part of the recorded
        distribution.
    """

    temperature: float = 0.0
    top_k: int = 0
    logprob_temperature: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not self.logprob_temperature > 0:
            raise ValueError(f"logprob_temperature must be > 0, got {self.logprob_temperature}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = Sampling()


def thread_key(seed: int, problem_id: object, path: str) -> np.ndarray:
    """Raw threefry key data (``uint32[2]``) of one thread: a pure function of seed, problem and path."""
    value = derive_seed(seed, "thread", problem_id, path)
    return np.array([value & 0xFFFFFFFF, value >> 32], np.uint32)


def sample(logits_BV: jax.Array, keys_B2: jax.Array, counters_B: jax.Array,
           sampling: Sampling) -> tuple[jax.Array, jax.Array]:
    """Next tokens ``[B]`` int32 and their log-probabilities ``[B]`` under ``logits / logprob_temperature``.

    By default (``logprob_temperature`` 1) the recorded log-probability is that of the unscaled model
    distribution, the quantity a fresh forward pass over the finished sequence gives, whatever the sampling.
    """
    logits_BV = logits_BV.astype(jnp.float32)
    if sampling.greedy:
        tokens_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    else:
        scaled_BV = logits_BV / sampling.temperature
        if sampling.top_k:
            kth_B1 = jax.lax.top_k(scaled_BV, min(sampling.top_k, scaled_BV.shape[-1]))[0][:, -1:]
            scaled_BV = jnp.where(scaled_BV < kth_B1, -jnp.inf, scaled_BV)

        def one(raw_2, counter, row_V):
            key = jax.random.fold_in(jax.random.wrap_key_data(raw_2, impl="threefry2x32"), counter)
            return jax.random.categorical(key, row_V)

        tokens_B = jax.vmap(one)(keys_B2, counters_B, scaled_BV).astype(jnp.int32)
    if sampling.logprob_temperature != 1.0:
        logits_BV = logits_BV / sampling.logprob_temperature
    logp_BV = jax.nn.log_softmax(logits_BV, axis=-1)
    return tokens_B, jnp.take_along_axis(logp_BV, tokens_B[:, None], axis=-1)[:, 0]
