"""Arithmetic fact sheets: the dense table of ``a op b = c`` facts as extra SFT sequences.

A small model trained on search traces sees each fact only a few times per epoch (a 20,000-problem SoS+ set
holds roughly 30 operations per trace over ~25,000 distinct facts), and learns the arithmetic last: on the
mini preset, after 7.6M tokens, 19% of the results after ``=`` were right, teacher-forced. A sheet is one
training sequence of facts written exactly as the solvers write operations (``game.combine``: ``a+b``,
``a*b`` in list order, larger-minus-smaller, exact larger/smaller), one per line::

    <s>34+15=49
    73-63=10
    510/10=51
    ...</s>

:class:`FactSheets` is a grain-compatible random-access source of sheets (each pass over the table is a new
seeded permutation, so the same seed gives the same sheets); :class:`ConcatSource` appends it to a training
source. ``SFTConfig.arith_facts`` sets the fraction of training tokens that come from sheets.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from apr_jax.countdown import game


def fact_table(max_operand: int) -> list[str]:
    """Every distinct operation text ``game.combine(a, b)`` writes for ``1 <= a, b <= max_operand``,
    in a fixed order (by ``a``, then ``b``, then the solver's order of operations)."""
    if not isinstance(max_operand, int) or max_operand < 1:
        raise ValueError(f"max_operand must be a positive int, got {max_operand!r}")
    seen, out = set(), []
    for a in range(1, max_operand + 1):
        for b in range(1, max_operand + 1):
            for _, text in game.combine(a, b):
                if text not in seen:
                    seen.add(text)
                    out.append(text)
    return out


class FactSheets:
    """``num_sheets`` sequences of ``facts_per_sheet`` facts each, BOS/EOS included.

    Sheet ``i`` holds facts ``r * F .. r * F + F - 1`` (``r = i mod sheets_per_pass``, ``F`` facts per sheet)
    of pass ``p = i // sheets_per_pass``, whose order is a permutation of the table seeded by ``(seed, p)``.
    Lengths are known without encoding any sheet (``lengths``), as the length-grouped batcher needs.
    """

    def __init__(self, encoder, *, bos_id: int, eos_id: int, num_sheets: int, facts_per_sheet: int = 160,
                 max_operand: int = 99, seed: int = 0, unk_id: int | None = None):
        if num_sheets < 1 or facts_per_sheet < 1:
            raise ValueError(f"num_sheets and facts_per_sheet must be positive, got {num_sheets}, "
                             f"{facts_per_sheet}")
        table = fact_table(max_operand)
        ids = encoder.encode_many([t + "\n" for t in table])
        bad = next((t for t, x in zip(table, ids) if len(x) == 0 or (unk_id is not None and (x == unk_id).any())),
                   None)
        if bad is not None:
            raise ValueError(f"the tokenizer cannot encode the arithmetic fact {bad!r} (unknown tokens)")
        self._ids = ids
        self._fact_len = np.asarray([len(x) for x in ids], dtype=np.int64)
        self.num_facts = len(table)
        self.facts_per_sheet = min(facts_per_sheet, self.num_facts)
        self.sheets_per_pass = math.ceil(self.num_facts / self.facts_per_sheet)
        self.num_sheets, self.seed = int(num_sheets), int(seed)
        self.bos_id, self.eos_id = int(bos_id), int(eos_id)

    def _order(self, p: int) -> np.ndarray:
        """The table's order in pass ``p`` (a permutation of 25,025 facts: well under a millisecond)."""
        return np.random.default_rng([self.seed, p]).permutation(self.num_facts)

    def _slice(self, i: int) -> np.ndarray:
        p, r = divmod(i, self.sheets_per_pass)
        return self._order(p)[r * self.facts_per_sheet:(r + 1) * self.facts_per_sheet]

    @functools.cached_property
    def lengths(self) -> np.ndarray:
        out = np.empty(self.num_sheets, dtype=np.int64)
        for p in range(math.ceil(self.num_sheets / self.sheets_per_pass)):
            order_len = self._fact_len[self._order(p)]
            bounds = np.arange(0, self.num_facts, self.facts_per_sheet)
            per_sheet = np.add.reduceat(order_len, bounds) + 2  # BOS and EOS
            start = p * self.sheets_per_pass
            n = min(self.sheets_per_pass, self.num_sheets - start)
            out[start:start + n] = per_sheet[:n]
        return out

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def __len__(self) -> int:
        return self.num_sheets

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"sheet {index} out of range for {len(self)} sheets")
        index %= len(self)
        parts = [np.asarray([self.bos_id], np.int32)]
        parts += [self._ids[k] for k in self._slice(index)]
        parts.append(np.asarray([self.eos_id], np.int32))
        return np.concatenate(parts).astype(np.int32)

    @classmethod
    def for_fraction(cls, fraction: float, base_tokens: int, encoder, **kwargs) -> "FactSheets":
        """Sheets whose tokens make ``fraction`` of ``base_tokens + sheet tokens``."""
        if not 0 < fraction < 1:
            raise ValueError(f"the fraction of fact tokens must be in (0, 1), got {fraction!r}")
        sheets = cls(encoder, num_sheets=1, **kwargs)
        per_sheet = (sheets._fact_len.sum() + 2 * sheets.sheets_per_pass) / sheets.sheets_per_pass  # mean
        sheets.num_sheets = max(1, round(fraction / (1 - fraction) * base_tokens / per_sheet))
        return sheets  # ``lengths`` is computed on first use, for the final count


class ConcatSource:
    """Sequences of several sources one after another (``len`` = the sum); ``lengths`` concatenated."""

    def __init__(self, *sources):
        if not sources:
            raise ValueError("ConcatSource needs at least one source")
        self.sources = sources
        self._starts = np.cumsum([0] + [len(s) for s in sources])
        self.meta = getattr(sources[0], "meta", None)

    @property
    def lengths(self) -> np.ndarray:
        return np.concatenate([np.asarray(s.lengths) for s in self.sources])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"sequence {index} out of range for {len(self)} sequences")
        index %= len(self)
        k = int(np.searchsorted(self._starts, index, side="right") - 1)
        return self.sources[k][index - int(self._starts[k])]

    def __repr__(self) -> str:
        return f"ConcatSource({', '.join(map(repr, self.sources))})"
