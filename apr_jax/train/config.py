"""Supervised fine-tuning (SFT) configuration.

:class:`SFTConfig` is a frozen, hashable dataclass, so it can be a static argument under ``jax.jit`` and a
field of :class:`apr_jax.presets.Preset`. Its defaults are the paper's recipe (Pan et al. 2025, App. B):
AdamW (b1 0.9, b2 0.999, weight decay 0.01), gradient clipping at 1.0, a warmup-cosine schedule
5e-6 -> 5e-5 (after 1 warmup step) -> 5e-7 over 19,000 steps of 256 sequences of up to 4,096 tokens.
:func:`paper`, :func:`mini` and :func:`tiny` give the per-preset variants.
"""

from __future__ import annotations

import dataclasses
import math

PAD_POLICIES = ("bucket", "pow2", "max")
DTYPES = ("float32", "bfloat16")


def _positive_int(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"SFTConfig.{name} must be a positive int, got {value!r}")


def _number(name: str, value, *, positive: bool) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"SFTConfig.{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"SFTConfig.{name} must be > 0, got {value!r}")
    if not positive and value < 0:
        raise ValueError(f"SFTConfig.{name} must be >= 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Hyper-parameters of one SFT run.

    Attributes:
      batch_size: sequences (or packed rows) per optimizer step, over all devices and micro-batches.
      grad_accum: micro-batches per optimizer step; gradients are summed over the micro-batches and
        divided by the total number of loss tokens, so ``grad_accum`` changes memory, not the maths.
      seq_len: context length; longer sequences are truncated (keeping BOS and the first tokens).
      steps: optimizer steps of the run. Exactly one of ``steps`` and ``epochs`` is set.
      epochs: passes over the training set; converted to ``floor(epochs * N / batch_size)`` steps
        (approximate when packing: rows are estimated from the token count).
      init_lr: learning rate at step 0.
      peak_lr: learning rate reached after ``warmup_steps`` (linear warmup).
      end_lr: learning rate at the last step (cosine decay from the peak).
      warmup_steps: linear warmup length in optimizer steps.
      b1, b2, eps: AdamW moments and epsilon.
      weight_decay: decoupled weight decay, applied to matrices (ndim >= 2) only, as HF Trainer does
        (norm scales are not decayed).
      clip: global gradient-norm clip (``optax.clip_by_global_norm``); 0 disables clipping.
      seed: seeds parameter initialisation and data shuffling (each epoch is a new permutation).
      log_every: steps between metric reads (the only host<->device sync of the loop).
      eval_every: steps between validation passes; 0 disables periodic validation (one is still run at
        the end when a validation set exists).
      eval_batches: cap on validation batches per pass; ``None`` evaluates the whole validation set.
      eval_batch_size: rows per validation batch; ``None`` uses the micro-batch size.
      ckpt_every: steps between checkpoints; 0 saves only at the end (and on interruption).
      keep_checkpoints: how many most recent checkpoints to keep.
      pad_policy: length the batch is padded to: ``"bucket"`` = the longest row rounded up to a multiple of
        ``bucket_size``; ``"pow2"`` = the longest row rounded up to a power of two (>= ``bucket_size``);
        ``"max"`` = always ``seq_len``. All are capped at ``seq_len``, so the train step compiles for at
        most ``seq_len / bucket_size`` (bucket) or ``log2(seq_len / bucket_size) + 1`` (pow2) shapes.
      bucket_size: granularity of the padded length (see ``pad_policy``).
      group_by_length: 0 = off. ``W > 0``: each window of ``W`` consecutive batches of the shuffled
        stream is sorted by length, cut into batches and those batches are visited in a seeded random
        order (as Hugging Face's ``group_by_length``): rows of a batch have similar lengths, so far less
        padding and fewer distinct shapes, at the cost of slightly less random batches. Not with packing.
      packing: pack several sequences into each row (first-fit), with per-sequence segment ids and
        positions; attention is restricted to the segment.
      packing_bins: rows filled at once by the first-fit packer (more bins = less padding); ``None`` uses
        ``batch_size``.
      mesh: ``(data, fsdp)`` device-mesh shape. ``-1`` in one entry takes the remaining devices.
      dtype: compute dtype override for the model (``"float32"`` or ``"bfloat16"``); ``None`` keeps the
        model config's.
      data_threads: grain reader threads; prefetch_batches: batches the reader keeps ready.
      arith_facts: fraction of training tokens taken from arithmetic fact sheets
        (:mod:`apr_jax.data.facts`, every ``a op b = c`` with operands up to ``arith_max_operand``, written
        as the solvers write operations) appended to the training set; 0 (the default, and the paper's
        recipe) adds none.
      mask_continuation_prompts: False (the paper's recipe): every non-pad token of every call has loss.
        True: a parent continuation's prompt (its pre-spawn text and the join block with the children's
        results, through the newline after ``<End Sub Searches>``) has none, as in the RL objective and at
        inference, where the runtime writes it. Trained on it, the model learns that the pre-spawn text is
        followed by ``<Sub Searches>`` about as often as by a spawn block (docs/rl.md, the spawn-point
        probe). Needs the data set's ``tokenizer.json``; no effect on SoS+ data.
    """

    batch_size: int = 256
    grad_accum: int = 1
    seq_len: int = 4096
    steps: int | None = 19_000
    epochs: float | None = None
    init_lr: float = 5e-6
    peak_lr: float = 5e-5
    end_lr: float = 5e-7
    warmup_steps: int = 1
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 500
    eval_batches: int | None = None
    eval_batch_size: int | None = None
    ckpt_every: int = 1000
    keep_checkpoints: int = 3
    pad_policy: str = "bucket"
    bucket_size: int = 128
    group_by_length: int = 0
    packing: bool = False
    packing_bins: int | None = None
    mesh: tuple[int, int] = (-1, 1)
    dtype: str | None = None
    data_threads: int = 1
    prefetch_batches: int = 2
    arith_facts: float = 0.0
    arith_max_operand: int = 99
    mask_continuation_prompts: bool = False

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "seq_len", "log_every", "keep_checkpoints",
                     "bucket_size", "data_threads", "prefetch_batches"):
            _positive_int(name, getattr(self, name))
        for name in ("eval_batches", "eval_batch_size", "packing_bins"):
            _positive_int(name, getattr(self, name), allow_none=True)
        for name in ("eval_every", "ckpt_every", "seed", "warmup_steps", "group_by_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"SFTConfig.{name} must be a non-negative int, got {value!r}")
        if (self.steps is None) == (self.epochs is None):
            raise ValueError(
                f"SFTConfig: set exactly one of steps and epochs (got steps={self.steps!r}, "
                f"epochs={self.epochs!r}; on the command line: --steps N or --epochs E, or --set with the other "
                f"one set to None)"
            )
        _positive_int("steps", self.steps, allow_none=True)
        if self.epochs is not None:
            _number("epochs", self.epochs, positive=True)
        for name in ("init_lr", "peak_lr", "end_lr", "eps"):
            _number(name, getattr(self, name), positive=True)
        for name in ("weight_decay", "clip"):
            _number(name, getattr(self, name), positive=False)
        for name in ("b1", "b2"):
            value = getattr(self, name)
            _number(name, value, positive=False)
            if value >= 1:
                raise ValueError(f"SFTConfig.{name} must be in [0, 1), got {value!r}")
        if self.steps is not None and self.warmup_steps > self.steps:
            raise ValueError(
                f"SFTConfig.warmup_steps ({self.warmup_steps}) exceeds steps ({self.steps})"
            )
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"SFTConfig.batch_size ({self.batch_size}) must be a multiple of grad_accum "
                f"({self.grad_accum})"
            )
        _number("arith_facts", self.arith_facts, positive=False)
        if self.arith_facts >= 1:
            raise ValueError(f"SFTConfig.arith_facts must be in [0, 1), got {self.arith_facts!r}")
        _positive_int("arith_max_operand", self.arith_max_operand)
        if self.pad_policy not in PAD_POLICIES:
            raise ValueError(f"SFTConfig.pad_policy must be one of {PAD_POLICIES}, got {self.pad_policy!r}")
        if self.seq_len < 2:
            raise ValueError(f"SFTConfig.seq_len must be >= 2 (a next-token target), got {self.seq_len}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"SFTConfig.dtype must be None or one of {DTYPES}, got {self.dtype!r}")
        for name in ("packing", "mask_continuation_prompts"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"SFTConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.packing and self.group_by_length:
            raise ValueError("SFTConfig: group_by_length and packing are exclusive (packed rows are full)")
        mesh = tuple(self.mesh)
        if len(mesh) != 2 or any(not isinstance(m, int) or isinstance(m, bool) for m in mesh):
            raise ValueError(f"SFTConfig.mesh must be two ints (data, fsdp), got {self.mesh!r}")
        if any(m == 0 or m < -1 for m in mesh) or mesh.count(-1) > 1:
            raise ValueError(
                f"SFTConfig.mesh entries must be positive, with at most one -1 (= remaining devices); "
                f"got {self.mesh!r}"
            )
        object.__setattr__(self, "mesh", mesh)

    @property
    def micro_batch_size(self) -> int:
        """Rows per micro-batch (``batch_size // grad_accum``)."""
        return self.batch_size // self.grad_accum

    @property
    def tokens_per_step(self) -> int:
        """Upper bound of tokens per optimizer step (every row full)."""
        return self.batch_size * self.seq_len

    def resolve_steps(self, num_sequences: int, num_tokens: int | None = None) -> int:
        """Optimizer steps of the run for a training set of ``num_sequences`` (``num_tokens`` tokens)."""
        if self.steps is not None:
            return self.steps
        if self.packing and num_tokens is not None:
            rows = math.ceil(num_tokens / self.seq_len)
        else:
            rows = num_sequences
        steps = int(self.epochs * rows // self.batch_size)
        if steps < 1:
            raise ValueError(
                f"SFTConfig.epochs={self.epochs} over {rows} rows at batch_size {self.batch_size} "
                "is less than one step"
            )
        return steps

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (for ``config.json``)."""
        out = dataclasses.asdict(self)
        out["mesh"] = list(self.mesh)
        return out

    @classmethod
    def from_dict(cls, values: dict) -> "SFTConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"SFTConfig has no field(s) {', '.join(unknown)}")
        values = dict(values)
        if "mesh" in values:
            values["mesh"] = tuple(values["mesh"])
        return cls(**values)


def paper(**overrides) -> SFTConfig:
    """The paper's SFT recipe: batch 256, context 4096, 19,000 steps."""
    return SFTConfig(**overrides)


def mini(**overrides) -> SFTConfig:
    """A CPU-sized run of the mini model: batch 16, context 4096, 2,000 steps.

    Length-grouped batches padded to a power of two: on the APR data this pads 28% of the positions
    (vs 54% for random batches padded to a multiple of 128) and the step compiles for at most 6 shapes,
    which matters on a CPU where one compilation of the mini model takes about a minute.
    """
    fields = dict(batch_size=16, steps=2_000, log_every=10, eval_every=200, eval_batches=16,
                  ckpt_every=200, pad_policy="pow2", group_by_length=32)
    return SFTConfig(**{**fields, **overrides})


def tiny(**overrides) -> SFTConfig:
    """A test-sized run: batch 8, context 256, 20 steps, lr peak 1e-3 so a few steps show learning."""
    fields = dict(batch_size=8, seq_len=256, steps=20, init_lr=1e-4, peak_lr=1e-3, end_lr=1e-4,
                  log_every=5, eval_every=10, eval_batches=2, ckpt_every=10, keep_checkpoints=2)
    return SFTConfig(**{**fields, **overrides})
