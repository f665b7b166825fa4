"""Which parts of a trace a checkpoint has learned: teacher-forced accuracy by kind of token, per checkpoint.

Usage::

    python experiments/probe_skills.py --ckpt runs/long_sosp --steps 50,200,400 --out runs/probe_sosp.json

Greedy accuracy is 0 until a model has learned everything a search needs; this probe shows what it has
learned on the way, at the cost of one forward pass per checkpoint. On ``--n`` validation demonstrations
(the run's own token arrays, i.e. exactly its training format) it takes the argmax prediction of every
token given the true prefix and reports, by the kind of token (from the trace module's line parser):

* ``operands``: the numbers ``a`` and ``b`` of an ``Exploring Operation: a op b=c`` line (the search's
  choice: partly random in the demonstrations, so not expected to reach 1), and ``operand_in_state``: how
  often the predicted ``a`` is a number of the current state at all (copying; should reach 1);
  ``operator``: the ``op``;
* ``result``: the value ``c`` (arithmetic); ``resulting``: the numbers of the ``Resulting Numbers`` list;
* ``generated``: the numbers of a ``Generated Node`` line (a copy of the line above); ``state``: the
  numbers of a ``Current State`` line (a copy of a node generated earlier: retrieval);
* ``other``: everything else (line openings, brackets and commas, ``Moving to Node``, goal lines, spawn/join
  markers).

Writes JSON (per step and kind: accuracy and token count) and a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from apr_jax.train.probe import KINDS, probe_checkpoint, validation_sequences


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="a training run folder")
    p.add_argument("--steps", help="checkpoint steps, comma-separated (default: the newest)")
    p.add_argument("--n", type=int, default=32, help="validation demonstrations")
    p.add_argument("--out", required=True, help="JSON output (a PNG is written beside it)")
    args = p.parse_args()

    from apr_jax.inference.evaluate import load_run_model
    from apr_jax.train.checkpoint import read_run_config

    record = read_run_config(args.ckpt)
    seqs = validation_sequences(record["data_dir"], record["method"], args.n)
    steps = [int(s) for s in args.steps.split(",")] if args.steps else [None]
    report = {"ckpt": args.ckpt, "method": record["method"], "sequences": len(seqs), "steps": {}}
    for step in steps:
        cfg, params, tok = load_run_model(args.ckpt, step=step)
        result = probe_checkpoint(cfg, params, tok, seqs)
        report["steps"][str(step)] = result
        print(f"step {step}: " + ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in result.items()
                                          if v["accuracy"] is not None), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    if len(steps) > 1:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for kind in KINDS:
            ys = [report["steps"][str(s)][kind]["accuracy"] for s in steps]
            ax.plot(steps, ys, marker="o", label=kind)
        ax.set_xlabel("SFT step")
        ax.set_ylabel("teacher-forced top-1 accuracy")
        ax.set_ylim(0, 1)
        ax.set_title(f"{record['method']}: what the model has learned ({len(seqs)} validation traces)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
