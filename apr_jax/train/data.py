"""Grain input pipeline for SFT: shuffle, truncate, (pack,) batch and pad to a length bucket.

A batch is a dict of numpy arrays, all ``[rows, T]``:

* ``tokens`` (int32): token ids, right-padded with ``pad_id``;
* ``positions`` (int32): position of each token in its sequence (restarting per packed segment);
* ``segment_ids`` (int32): 1, 2, ... for the sequences of a row, 0 on padding;
* ``loss_mask`` (bool): ``segment_ids > 0``, i.e. every non-pad token, prompt included (the paper's recipe);
  with a ``prompt_end_id`` (``SFTConfig.mask_continuation_prompts``) a parent continuation's prompt, its
  pre-spawn text and join block through the newline after ``<End Sub Searches>``, is left out
  (:func:`continuation_prompt_mask`).

``T`` is the longest row of the batch rounded up to the padding bucket (``SFTConfig.pad_policy``), capped
at ``seq_len``, so the train step only ever sees a small fixed set of shapes. Sequences longer than
``seq_len`` keep their first ``seq_len`` tokens (BOS included, EOS cut).

The training iterator is a grain ``DatasetIterator``: ``get_state()`` is a small JSON-able dict and
``set_state()`` on a fresh iterator resumes with exactly the batches that would have followed. Each pass
over the data is a new seeded permutation (``shuffle`` before ``repeat``).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Iterator, Sequence

import grain
import numpy as np

from apr_jax.data.arrays import TokenArraySource
from apr_jax.train.config import SFTConfig

log = logging.getLogger(__name__)

BATCH_KEYS = ("tokens", "positions", "segment_ids", "loss_mask")


def continuation_prompt_mask(tokens: np.ndarray, segment_ids: np.ndarray, end_id: int) -> np.ndarray:
    """Loss mask ``[rows, T]`` that leaves out every token of a sequence up to and including the token after
    its last ``end_id`` (``<End Sub Searches>``, then the newline that closes the join block).

    That prefix is the prompt of a parent continuation (``traces.parent_continuation``: the pre-spawn text,
    then the children's results), which the runtime writes and the RL objective masks. Trained on it, a
    model learns that the pre-spawn text is followed by ``<Sub Searches>`` as often as by a spawn block
    (each spawn's first call and its continuation share that text). Sequences without ``end_id`` (SoS+
    traces, children, first parent calls) keep every non-pad token; packed segments are handled one by one.
    """
    loss = segment_ids > 0
    for row, col in zip(*np.nonzero((tokens == end_id) & loss)):
        upto = min(int(col) + 2, tokens.shape[1])
        loss[row, :upto] &= segment_ids[row, :upto] != segment_ids[row, col]
    return loss


def _loss_mask(tokens: np.ndarray, segment_ids: np.ndarray, prompt_end_id: int | None) -> np.ndarray:
    if prompt_end_id is None:
        return segment_ids > 0
    return continuation_prompt_mask(tokens, segment_ids, prompt_end_id)


def bucket_length(max_len: int, seq_len: int, policy: str, bucket_size: int) -> int:
    """Padded length for a batch whose longest row has ``max_len`` tokens (see ``SFTConfig.pad_policy``)."""
    max_len = max(int(max_len), 1)
    if policy == "max":
        return seq_len
    if policy == "bucket":
        length = -(-max_len // bucket_size) * bucket_size
    elif policy == "pow2":
        length = max(bucket_size, 1 << (max_len - 1).bit_length())
    else:
        raise ValueError(f"unknown pad policy {policy!r}")
    return min(length, seq_len)


def possible_lengths(cfg: SFTConfig) -> list[int]:
    """Every padded length the pipeline can emit (the shapes the train step may compile for)."""
    return sorted({bucket_length(n, cfg.seq_len, cfg.pad_policy, cfg.bucket_size)
                   for n in range(1, cfg.seq_len + 1)})


@dataclasses.dataclass(frozen=True)
class Truncate:
    """Keep the first ``seq_len`` tokens of a sequence, as int32."""

    seq_len: int

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        return np.asarray(tokens[: self.seq_len], dtype=np.int32)


@dataclasses.dataclass(frozen=True)
class PadBatch:
    """``batch_fn`` for grain: a list of 1-D token arrays -> a padded batch dict.

    ``rows`` (when set) pads the batch with empty rows up to that many rows (for the last, short
    validation batch), so the row count is fixed too. ``prompt_end_id``: see :func:`continuation_prompt_mask`.
    """

    seq_len: int
    pad_id: int
    policy: str
    bucket_size: int
    rows: int | None = None
    prompt_end_id: int | None = None

    def __call__(self, seqs: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        n_rows = self.rows or len(seqs)
        lengths = [min(len(s), self.seq_len) for s in seqs]
        length = bucket_length(max(lengths, default=1), self.seq_len, self.policy, self.bucket_size)
        tokens = np.full((n_rows, length), self.pad_id, dtype=np.int32)
        segment_ids = np.zeros((n_rows, length), dtype=np.int32)
        for row, (seq, n) in enumerate(zip(seqs, lengths)):
            tokens[row, :n] = seq[:n]
            segment_ids[row, :n] = 1
        positions = np.broadcast_to(np.arange(length, dtype=np.int32), (n_rows, length)).copy()
        positions *= segment_ids
        return {"tokens": tokens, "positions": positions, "segment_ids": segment_ids,
                "loss_mask": _loss_mask(tokens, segment_ids, self.prompt_end_id)}


@dataclasses.dataclass(frozen=True)
class TrimPacked:
    """``batch_fn`` for packed rows: stack grain's packed examples and cut to the length bucket."""

    seq_len: int
    pad_id: int
    policy: str
    bucket_size: int
    prompt_end_id: int | None = None

    def __call__(self, rows: Sequence[dict]) -> dict[str, np.ndarray]:
        tokens = np.stack([r["tokens"] for r in rows]).astype(np.int32)
        segment_ids = np.stack([r["tokens_segment_ids"] for r in rows]).astype(np.int32)
        positions = np.stack([r["tokens_positions"] for r in rows]).astype(np.int32)
        used = (segment_ids > 0).sum(axis=1).max(initial=1)
        length = bucket_length(used, self.seq_len, self.policy, self.bucket_size)
        tokens, segment_ids, positions = tokens[:, :length], segment_ids[:, :length], positions[:, :length]
        tokens = np.where(segment_ids > 0, tokens, self.pad_id).astype(np.int32)
        positions = positions * (segment_ids > 0)
        return {"tokens": tokens, "positions": positions.astype(np.int32), "segment_ids": segment_ids,
                "loss_mask": _loss_mask(tokens, segment_ids, self.prompt_end_id)}


def _as_packable(tokens: np.ndarray) -> dict[str, np.ndarray]:
    return {"tokens": tokens}


class LengthGroupedBatch:
    """Batch ``j`` of a length-grouped stream (``SFTConfig.group_by_length``), as a pure function of ``j``.

    Window ``w`` holds batches ``w*W .. w*W+W-1`` and the next ``W * batch_size`` indices of the seeded,
    per-epoch reshuffled index stream; it is sorted by (truncated) length, cut into ``W`` batches, and
    batch ``j`` is the ``order_w[j % W]``-th of them, ``order_w`` a permutation seeded by ``(seed, w)``.
    The state of the iterator is therefore just the batch index.
    """

    def __init__(self, source, cfg: SFTConfig, pad_id: int, seed: int, prompt_end_id: int | None = None):
        self.source, self.window, self.rows, self.seed = source, cfg.group_by_length, cfg.batch_size, seed
        self.lengths = np.minimum(np.asarray(source.lengths), cfg.seq_len)
        self.order = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat(None)
        self.pad = PadBatch(cfg.seq_len, pad_id, cfg.pad_policy, cfg.bucket_size, prompt_end_id=prompt_end_id)
        self.truncate = Truncate(cfg.seq_len)
        self._cached: tuple[int, np.ndarray] | None = None

    def _window(self, w: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != w:
            size = self.window * self.rows
            idx = np.array([self.order[w * size + i] for i in range(size)], dtype=np.int64)
            idx = idx[np.argsort(self.lengths[idx], kind="stable")].reshape(self.window, self.rows)
            order = np.random.default_rng([self.seed, w]).permutation(self.window)
            self._cached = (w, idx[order])
        return self._cached[1]

    def __call__(self, j: int) -> dict[str, np.ndarray]:
        w, r = divmod(int(j), self.window)
        return self.pad([self.truncate(self.source[i]) for i in self._window(w)[r]])


def train_dataset(source, cfg: SFTConfig, pad_id: int, seed: int | None = None,
                  prompt_end_id: int | None = None) -> grain.IterDataset:
    """The infinite, shuffled training stream of batches of ``cfg.batch_size`` rows (``prompt_end_id``: see
    :func:`continuation_prompt_mask`)."""
    if len(source) == 0:
        raise ValueError("the training set is empty")
    seed = cfg.seed if seed is None else seed
    read = grain.ReadOptions(num_threads=cfg.data_threads, prefetch_buffer_size=cfg.prefetch_batches)
    if cfg.group_by_length:
        # Batch indices 0, 1, 2, ... (an unbounded range) mapped to their length-grouped batch; one reader
        # thread, as LengthGroupedBatch caches its current window.
        batches = grain.MapDataset.range(sys.maxsize).map(LengthGroupedBatch(source, cfg, pad_id, seed,
                                                                             prompt_end_id))
        return batches.to_iter_dataset(dataclasses.replace(read, num_threads=1))
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
    ds = ds.map(Truncate(cfg.seq_len))
    if not cfg.packing:
        pad = PadBatch(cfg.seq_len, pad_id, cfg.pad_policy, cfg.bucket_size, prompt_end_id=prompt_end_id)
        return ds.batch(cfg.batch_size, drop_remainder=True, batch_fn=pad).to_iter_dataset(read)
    # Packing reads sequences one by one, so prefetch them individually, then the packed batches.
    per_seq = grain.ReadOptions(num_threads=cfg.data_threads,
                                prefetch_buffer_size=cfg.prefetch_batches * cfg.batch_size)
    stream = ds.map(_as_packable).to_iter_dataset(per_seq)
    packed = grain.experimental.FirstFitPackIterDataset(
        stream,
        length_struct={"tokens": cfg.seq_len},
        num_packing_bins=cfg.packing_bins or cfg.batch_size,
        seed=seed,
        shuffle_bins=True,
        padding_struct={"tokens": pad_id},
    )
    trim = TrimPacked(cfg.seq_len, pad_id, cfg.pad_policy, cfg.bucket_size, prompt_end_id)
    batched = packed.batch(cfg.batch_size, drop_remainder=True, batch_fn=trim)
    return grain.experimental.ThreadPrefetchIterDataset(batched, prefetch_buffer_size=cfg.prefetch_batches)


def train_iterator(source, cfg: SFTConfig, pad_id: int, state: dict | None = None,
                   prompt_end_id: int | None = None):
    """A checkpointable iterator over training batches, optionally restored from ``state``."""
    iterator = iter(train_dataset(source, cfg, pad_id, prompt_end_id=prompt_end_id))
    if state is not None:
        try:
            iterator.set_state(state)
        except Exception as err:  # grain raises various types for a state of another pipeline
            iterator.close()
            raise ValueError(
                f"the saved data-iterator state {state!r} does not fit this data pipeline (did packing or "
                f"group_by_length change since the checkpoint?): {type(err).__name__}: {err}"
            ) from err
    return iterator


def eval_batches(source, cfg: SFTConfig, pad_id: int, max_batches: int | None = None,
                 prompt_end_id: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """One pass over (the first ``max_batches * rows`` sequences of) a validation source.

    The selected sequences are batched in order of length (the mean loss does not depend on the order),
    so batches carry little padding and few shapes. Rows are ``cfg.eval_batch_size`` (default: the
    micro-batch size); the last batch is filled with empty rows, which carry no loss.
    """
    rows = cfg.eval_batch_size or cfg.micro_batch_size
    count = len(source) if max_batches is None else min(len(source), max_batches * rows)
    lengths = getattr(source, "lengths", None)
    if lengths is None:
        lengths = [len(source[i]) for i in range(count)]
    lengths = np.asarray(lengths)[:count]
    order = np.argsort(lengths, kind="stable")
    pad = PadBatch(cfg.seq_len, pad_id, cfg.pad_policy, cfg.bucket_size, rows=rows, prompt_end_id=prompt_end_id)
    ds = grain.MapDataset.source(source).map(Truncate(cfg.seq_len))
    for start in range(0, count, rows):
        yield pad([ds[int(i)] for i in order[start:start + rows]])


def truncation_report(lengths: np.ndarray, seq_len: int) -> str | None:
    """A warning line when some sequences exceed ``seq_len`` (``None`` when none do)."""
    lengths = np.asarray(lengths)
    over = int((lengths > seq_len).sum())
    if not over:
        return None
    return (f"{over} of {len(lengths)} sequences ({100 * over / len(lengths):.2f}%) are longer than "
            f"seq_len={seq_len} (max {int(lengths.max())}) and will be truncated")


def padding_efficiency(batch: dict[str, np.ndarray]) -> float:
    """Fraction of the batch's positions that hold real tokens."""
    return float((batch["segment_ids"] > 0).mean())


def with_fact_sheets(train_src, data_dir: str | Path, cfg: SFTConfig):
    """``train_src`` followed by arithmetic fact sheets making ``cfg.arith_facts`` of its tokens."""
    from apr_jax.data import facts
    from apr_jax.data import tokenizer as tokenization

    # The tokenizer.json model itself (the fast encoder equals it only on our own vocabularies).
    tok = data_tokenizer(data_dir, "arith_facts")
    encoder = tokenization.HFEncoder(tok)
    base = int(np.minimum(train_src.lengths, cfg.seq_len).sum())
    sheets = facts.FactSheets.for_fraction(cfg.arith_facts, base, encoder, bos_id=train_src.meta["bos_id"],
                                           eos_id=train_src.meta["eos_id"], max_operand=cfg.arith_max_operand,
                                           seed=cfg.seed, unk_id=tok.token_to_id("<unk>"))
    log.info("arith_facts=%.2f: %d fact sheets (%d facts each, %.2fM tokens) appended to %d sequences",
             cfg.arith_facts, len(sheets), sheets.facts_per_sheet, sheets.num_tokens / 1e6, len(train_src))
    return facts.ConcatSource(train_src, sheets)


def data_tokenizer(data_dir: str | Path, needed_by: str):
    """The ``tokenizer.json`` of a data set (a clear error naming ``needed_by`` when it has none)."""
    from apr_jax.data import tokenizer as tokenization

    path = Path(data_dir) / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"{needed_by} needs the data set's tokenizer at {path.absolute()}")
    return tokenization.load_tokenizer(path)


def continuation_prompt_end_id(data_dir: str | Path) -> int:
    """Token id of ``<End Sub Searches>`` in the data set's tokenizer (``SFTConfig.mask_continuation_prompts``)."""
    from apr_jax.countdown.traces import JOIN_CLOSE

    end_id = data_tokenizer(data_dir, "mask_continuation_prompts").token_to_id(JOIN_CLOSE)
    if end_id is None:
        raise ValueError(f"the tokenizer of {Path(data_dir).absolute()} has no {JOIN_CLOSE!r} token: "
                         "mask_continuation_prompts needs it")
    return int(end_id)


def open_sources(data_dir: str | Path, method: str):
    """``(train, val)`` ``TokenArraySource``s of ``DATA/arrays/{method}_{train,val}`` (val may be None)."""
    root = Path(data_dir) / "arrays"
    train_dir, val_dir = root / f"{method}_train", root / f"{method}_val"
    if not (train_dir / "meta.json").exists():
        raise FileNotFoundError(f"no training arrays at {train_dir.absolute()} (build the data set first)")
    val = TokenArraySource(val_dir) if (val_dir / "meta.json").exists() else None
    if val is None:
        log.warning("no validation arrays at %s: validation loss is skipped", val_dir)
    return TokenArraySource(train_dir), val
