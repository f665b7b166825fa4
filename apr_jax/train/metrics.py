"""Run metrics: ``metrics.jsonl`` (one JSON object per record), TensorBoard events and ``loss.png``.

Every record has ``step`` and a ``split`` (``"train"`` or ``"val"``) plus scalar fields. The JSONL file is
appended to (a resumed run continues it; records at steps after the resume point are dropped first, so
the file never holds the same step twice).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tensorboard"
PLOT_FILE = "loss.png"


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All records of ``RUN_DIR/metrics.jsonl`` (empty when absent; a torn last line is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(run_dir: str | Path, last_step: int) -> None:
    """Drop records after ``last_step`` (used when resuming from a checkpoint at ``last_step``)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return
    kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= last_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


class MetricsWriter:
    """Writes scalar records to ``metrics.jsonl`` and TensorBoard (``RUN_DIR/tensorboard``)."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / TB_DIR))

    def write(self, step: int, split: str, values: dict) -> None:
        record = {"step": int(step), "split": split}
        for key, value in values.items():
            record[key] = _jsonable(value)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key in ("step", "split") or not isinstance(value, (int, float)):
                    continue
                self._tb.add_scalar(f"{split}/{key}", value, int(step))

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _jsonable(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan" / "inf": valid JSON, and visibly not a number
    return value


def _series(records: Iterable[dict], split: str, key: str = "loss") -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        if r.get("split") == split and isinstance(r.get(key), (int, float)):
            xs.append(r["step"])
            ys.append(r[key])
    return xs, ys


def plot_losses(run_dir: str | Path, title: str | None = None) -> Path | None:
    """Save ``RUN_DIR/loss.png`` (train and validation loss against step); ``None`` without records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = _series(records, "train")
    val = _series(records, "val")
    if not train[0] and not val[0]:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train[0]:
        ax.plot(*train, label="train", lw=1.2)
    if val[0]:
        ax.plot(*val, "o-", label="validation", lw=1.2, ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title or Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    if all(y > 0 for y in train[1] + val[1]):
        ax.set_yscale("log")
    fig.tight_layout()
    path = Path(run_dir) / PLOT_FILE
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
