"""Rollout result records -> GRPO training sequences -> padded batches.

A rollout record is what :meth:`apr_jax.inference.runtime.Runtime.solve` returns for one problem. Each of its
threads that ran is one language-model call (a parent call, a parent continuation after a join, or a child)
and becomes one :class:`Sequence`: exactly the ids the engine prefilled (``prompt_ids``, BOS included)
followed by the ids it sampled (``token_ids``). Only sampled ids carry loss, so prompts and the join results
injected into a continuation's prompt are masked (Pan et al. 2025, arXiv 2504.15466, Sec. 4: the whole
thread tree is trained on the rollout's reward).

Alignment: a sequence of ``L`` tokens predicts ``targets = tokens[1:]`` from ``inputs = tokens[:-1]``; its
``loss_mask`` and ``old_logprobs`` have ``L - 1`` entries aligned with ``targets``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence as SequenceOf

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Sequence:
    """One language-model call of a rollout, ready for the GRPO loss.

    Attributes:
      tokens: int32 ``[L]``, ``prompt_ids + token_ids`` exactly (BOS once, at position 0).
      loss_mask: bool ``[L - 1]``, aligned with ``targets = tokens[1:]``:
        ``[False] * (len(prompt_ids) - 1) + [True] * len(token_ids)``, except that tokens a decoding aid
        forced (the thread's ``forced`` positions) are False too.
      old_logprobs: float32 ``[L - 1]``, aligned with the targets: the sampling model's log-probability of
        each generated id, 0 where masked.
      rollout: rollout index (row of the step's rollouts).
      rollout_size: number of sequences of this rollout (the loss divides by it).
      advantage: the rollout's group-normalised advantage, shared by all its sequences.
      role: "parent", "child" or "sample".
      path: the thread's path in the tree (e.g. "p0", "p0.c1", "p1").
    """

    tokens: np.ndarray
    loss_mask: np.ndarray
    old_logprobs: np.ndarray
    rollout: int
    rollout_size: int
    advantage: float
    role: str
    path: str

    @property
    def targets(self) -> np.ndarray:
        """``tokens[1:]``, the ids predicted at each position."""
        return self.tokens[1:]


def _ran(thread: dict) -> bool:
    return bool(thread.get("token_ids"))


def _sequence(thread: dict, rollout: int, rollout_size: int, advantage: float) -> Sequence:
    prompt, generated, logprobs = thread.get("prompt_ids"), thread["token_ids"], thread.get("logprobs")
    path = thread.get("path")
    if not prompt:
        raise ValueError(f"thread {path!r} generated tokens but has no prompt_ids")
    if logprobs is None or len(logprobs) != len(generated):
        raise ValueError(f"thread {path!r}: {len(generated)} token_ids but "
                         f"{None if logprobs is None else len(logprobs)} logprobs")
    n_masked = len(prompt) - 1
    sampled = np.ones(len(generated), np.bool_)
    sampled[list(thread.get("forced", ()))] = False  # written by a decoding aid, not by the policy
    return Sequence(
        tokens=np.asarray(list(prompt) + list(generated), dtype=np.int32),
        loss_mask=np.concatenate([np.zeros(n_masked, np.bool_), sampled]),
        old_logprobs=np.concatenate([np.zeros(n_masked, np.float32), np.asarray(logprobs, np.float32)]),
        rollout=rollout, rollout_size=rollout_size, advantage=float(advantage), role=thread["role"], path=path)


def rollout_sequences(records: SequenceOf[dict], advantages: SequenceOf[float],
                      first_rollout_index: int = 0, drop_roles: SequenceOf[str] = ()) -> list[Sequence]:
    """One :class:`Sequence` per thread that ran (non-empty ``token_ids``) of each record.

    All sequences of ``records[i]`` get advantage ``advantages[i]`` and rollout index
    ``first_rollout_index + i``. Threads that never ran or generated nothing are skipped. ``drop_roles``
    leaves out the threads of those roles (e.g. ``("child",)``); ``rollout_size`` still counts every thread
    of the tree that ran, so a kept sequence weighs what it would in the whole tree.
    """
    if len(records) != len(advantages):
        raise ValueError(f"rollout_sequences: {len(records)} records but {len(advantages)} advantages")
    out = []
    for i, (record, advantage) in enumerate(zip(records, advantages)):
        threads = [t for t in record["threads"] if _ran(t)]
        out.extend(_sequence(t, first_rollout_index + i, len(threads), advantage) for t in threads
                   if t["role"] not in drop_roles)
    return out


def pad_batch(seqs: SequenceOf[Sequence], batch_rows: int, width: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Right-pad ``seqs`` into ``batch_rows`` rows of ``width`` input positions.

    Returns:
      ``inputs_BT`` int32 (``tokens[:-1]``), ``targets_BT`` int32 (``tokens[1:]``), ``mask_BT`` bool,
      ``old_logp_BT`` float32, ``adv_B`` float32, ``rollout_B`` int32 (-1 for padding rows) and
      ``rollout_size_B`` int32 (0 for padding rows). Padding positions hold ``pad_id``, mask False and
      log-prob 0.

    Raises:
      ValueError: more sequences than ``batch_rows``, or a sequence longer than ``width + 1`` tokens.
    """
    if len(seqs) > batch_rows:
        raise ValueError(f"pad_batch: {len(seqs)} sequences do not fit in {batch_rows} rows")
    out = {
        "inputs_BT": np.full((batch_rows, width), pad_id, np.int32),
        "targets_BT": np.full((batch_rows, width), pad_id, np.int32),
        "mask_BT": np.zeros((batch_rows, width), np.bool_),
        "old_logp_BT": np.zeros((batch_rows, width), np.float32),
        "adv_B": np.zeros((batch_rows,), np.float32),
        "rollout_B": np.full((batch_rows,), -1, np.int32),
        "rollout_size_B": np.zeros((batch_rows,), np.int32),
    }
    for b, seq in enumerate(seqs):
        n = len(seq.tokens) - 1
        if n > width:
            raise ValueError(f"pad_batch: sequence {seq.path!r} of rollout {seq.rollout} has {len(seq.tokens)} "
                             f"tokens, more than width + 1 = {width + 1}")
        out["inputs_BT"][b, :n] = seq.tokens[:-1]
        out["targets_BT"][b, :n] = seq.tokens[1:]
        out["mask_BT"][b, :n] = seq.loss_mask
        out["old_logp_BT"][b, :n] = seq.old_logprobs
        out["adv_B"][b] = seq.advantage
        out["rollout_B"][b] = seq.rollout
        out["rollout_size_B"][b] = seq.rollout_size
    return out


def bucket_width(length: int, quantum: int = 64, cap: int | None = None) -> int:
    """Smallest ``quantum * 2**k >= length`` (k >= 0), then ``min(., cap)`` when ``cap`` is given.

    Use ``bucket_width(len(seq.tokens) - 1)`` for a :func:`pad_batch` width; few distinct widths means few
    compilations of the train step.
    """
    if quantum <= 0:
        raise ValueError(f"bucket_width: quantum must be > 0, got {quantum}")
    width = quantum
    while width < length:
        width *= 2
    return width if cap is None else min(width, cap)
