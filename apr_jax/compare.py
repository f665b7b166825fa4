"""Is a difference in accuracy real? Two evaluations of the same problems, compared problem by problem.

Two evaluations (two models, two methods, one method at two contexts) of one problem set differ only on the
problems that exactly one of them solves. Under "no difference" each such problem is equally likely to go
either way, so the exact McNemar test is a two-sided binomial test of ``a_only`` out of ``a_only + b_only``
at 1/2. Each accuracy also gets a 95% Wilson score interval. scipy (a dependency of jax) does the arithmetic.

Evaluations are matched by problem id over the problems both hold (the same-context sweep evaluates the first
100 of the 200 problems the main evaluation holds); a shared id naming two different problems is an error.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class Paired:
    """Accuracy of evaluations A and B on the ``n`` problems both hold."""

    n: int
    a_correct: int
    b_correct: int
    a_only: int  # problems A solves and B does not
    b_only: int
    p_value: float  # exact McNemar, two-sided
    a_interval: tuple[float, float]  # 95% Wilson interval of A's accuracy
    b_interval: tuple[float, float]

    @property
    def a_accuracy(self) -> float:
        return self.a_correct / self.n

    @property
    def b_accuracy(self) -> float:
        return self.b_correct / self.n


def wilson_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of ``correct / n``."""
    from scipy.stats import binomtest

    if n <= 0 or not 0 <= correct <= n:
        raise ValueError(f"wilson_interval needs 0 <= correct <= n and n > 0, got {correct} of {n}")
    ci = binomtest(correct, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (1.0 when there are none)."""
    from scipy.stats import binomtest

    if a_only < 0 or b_only < 0:
        raise ValueError(f"discordant counts must be >= 0, got {a_only} and {b_only}")
    if a_only + b_only == 0:
        return 1.0
    return float(min(1.0, binomtest(a_only, a_only + b_only, 0.5).pvalue))


def read(path: str | Path) -> list[dict]:
    """The result records of an ``apr-jax eval`` JSON Lines file (a malformed line is named by
    :func:`apr_jax.data.datasets.read_jsonl`)."""
    from apr_jax.data import datasets

    records = list(datasets.read_jsonl(path))
    if not records:
        raise ValueError(f"{path}: no result records")
    return records


def _by_problem(results: Sequence[dict], name: str) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for i, record in enumerate(results):
        try:
            pid, correct = record["problem"]["id"], record["correct"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"{name}: record {i + 1} is not an evaluation result (no problem id or "
                             f"'correct' field: {e!r})") from None
        if pid in out:
            raise ValueError(f"{name}: problem id {pid} appears twice (records of two evaluations mixed?)")
        if not isinstance(correct, bool):
            raise ValueError(f"{name}: record {i + 1} has correct={correct!r}, not true or false")
        out[pid] = record
    return out


def paired(a: Sequence[dict], b: Sequence[dict], names: tuple[str, str] = ("A", "B")) -> Paired:
    """Compare two evaluations' result records (``apr-jax eval`` JSON Lines) on the problems both hold."""
    by_a, by_b = _by_problem(a, names[0]), _by_problem(b, names[1])
    shared = [pid for pid in by_a if pid in by_b]
    if not shared:
        raise ValueError(f"{names[0]} and {names[1]} share no problem ids: not evaluations of one problem set")
    for pid in shared:
        pa, pb = by_a[pid]["problem"], by_b[pid]["problem"]
        if (pa.get("nums"), pa.get("target")) != (pb.get("nums"), pb.get("target")):
            raise ValueError(f"problem id {pid} is {pa.get('nums')} -> {pa.get('target')} in {names[0]} but "
                             f"{pb.get('nums')} -> {pb.get('target')} in {names[1]}: not one problem set")
    ca = [by_a[pid]["correct"] for pid in shared]
    cb = [by_b[pid]["correct"] for pid in shared]
    a_only = sum(x and not y for x, y in zip(ca, cb))
    b_only = sum(y and not x for x, y in zip(ca, cb))
    n = len(shared)
    return Paired(n=n, a_correct=sum(ca), b_correct=sum(cb), a_only=a_only, b_only=b_only,
                  p_value=mcnemar_exact(a_only, b_only), a_interval=wilson_interval(sum(ca), n),
                  b_interval=wilson_interval(sum(cb), n))


def format_accuracy(correct: int, n: int, interval: tuple[float, float]) -> str:
    """``25.0% [19.5, 31.4]``: an accuracy with its interval, in percent."""
    return f"{100 * correct / n:.1f}% [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def table_row(label: str, p: Paired) -> str:
    """One Markdown row: label, n, both accuracies with intervals, discordant counts, p-value."""
    return (f"| {label} | {p.n} | {format_accuracy(p.a_correct, p.n, p.a_interval)} | "
            f"{format_accuracy(p.b_correct, p.n, p.b_interval)} | {p.a_only} | {p.b_only} | {p.p_value:.3g} |")


TABLE_HEADER = ["| A vs B | problems | A (95% interval) | B (95% interval) | only A solves | only B solves "
                "| p (exact McNemar) |", "|---|---|---|---|---|---|---|"]
