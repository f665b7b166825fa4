"""GRPO runs side by side: children per rollout, what the parents chose, and how each choice was credited.

    python experiments/rl_choices.py --run paper=runs/more_apr/rl_base3 --run token=runs/more_apr/rl_token \\
        --from-step 15 --window 5 --out runs/rl_choices

Reads each run's ``metrics.jsonl`` (no model is loaded) and, per window of ``--window`` steps after
``--from-step``: children per rollout, rollout reward, the share of rollouts whose parent spawned, searched on
alone or wrote the join marker itself (:func:`apr_jax.rl.objective.parent_choice`), each choice's mean reward
and its mean advantage in the groups that mixed choices (:func:`apr_jax.rl.objective.choice_credit`: > 0
means the outcome reward pushes that choice up), the KL, and the last greedy validation. For a run made with
``--save-rollouts`` also, over its spawning rollouts: ``child_solved`` (some child returned a verified path,
:func:`apr_jax.inference.runtime.child_solved`), ``assembled`` (of those, the share whose parent answered
correctly) and ``found_but_penalised`` (of those, the share with a negative advantage: a child's successful
search trained down because its parent failed to use it; every sequence of a tree shares its advantage).
Prints a Markdown table, writes ``rl_choices.json`` and ``rl_choices.png`` (children and spawn share per step,
one line per run).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _evals import ROOT  # noqa: F401  (puts the checkout on sys.path)

FIELDS = ("children", "reward", "spawn_share", "serial_share", "join_marker_share", "spawn_reward", "serial_reward",
          "spawn_advantage", "serial_advantage", "kl", "child_solved", "assembled", "found_but_penalised")


def rollout_fields(run_dir: str | Path, step: int) -> dict:
    """``child_solved``, ``assembled`` and ``found_but_penalised`` of one step's saved rollouts ({} if none)."""
    from apr_jax.data.datasets import read_jsonl
    from apr_jax.inference.runtime import child_solved

    path = Path(run_dir) / "rollouts" / f"step_{step:05d}.jsonl"
    if not path.exists():
        return {}
    spawned = [r for r in read_jsonl(path) if r["choice"] == "spawn"]
    found = [r for r in spawned if child_solved(r)]
    out = {"child_solved": len(found) / len(spawned)} if spawned else {}
    if found:
        out["assembled"] = sum(r["correct"] for r in found) / len(found)
        out["found_but_penalised"] = sum(r["advantage"] < 0 for r in found) / len(found)
    return out


def windows(records: list[dict], start: int, width: int) -> list[dict]:
    """Means of :data:`FIELDS` over consecutive windows of ``width`` training steps after ``start`` (a field
    missing from every step of a window is left out of it)."""
    train = sorted((r for r in records if r.get("split") == "train" and r["step"] > start), key=lambda r: r["step"])
    out = []
    for i in range(0, len(train), width):
        chunk = train[i:i + width]
        row = {"steps": f"{chunk[0]['step']}-{chunk[-1]['step']}"}
        for field in FIELDS:
            values = [r[field] for r in chunk if isinstance(r.get(field), (int, float))]
            if values:
                row[field] = sum(values) / len(values)
        out.append(row)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", required=True, metavar="NAME=DIR", help="a GRPO run folder (repeatable)")
    p.add_argument("--from-step", type=int, default=0, help="first step after this one")
    p.add_argument("--window", type=int, default=5, help="steps per table row")
    p.add_argument("--out", required=True, help="folder for rl_choices.json and rl_choices.png")
    args = p.parse_args()
    import matplotlib.pyplot as plt

    from apr_jax.train.metrics import read_metrics

    runs = {}
    for spec in args.run:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            p.error(f"--run wants NAME=DIR, got {spec!r}")
        records = read_metrics(folder)
        if not records:
            p.error(f"{folder}: no metrics.jsonl records")
        for r in records:
            if r.get("split") == "train":
                r.update(rollout_fields(folder, r["step"]))
        val = [r for r in records if r.get("split") == "val" and r["step"] > args.from_step]
        runs[name] = {"dir": folder, "windows": windows(records, args.from_step, args.window),
                      "validation": val[-1] if val else None,
                      "steps": [r for r in records if r.get("split") == "train" and r["step"] > args.from_step]}

    header = ["run", "steps"] + list(FIELDS)
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, run in runs.items():
        for row in run["windows"]:
            cells = [f"{row[f]:.3f}" if f in row else "-" for f in FIELDS]
            print(f"| {name} | {row['steps']} | " + " | ".join(cells) + " |")
    for name, run in runs.items():
        v = run["validation"]
        if v:
            print(f"{name}: greedy validation at step {v['step']}: {v['accuracy']:.1%}, "
                  f"{v.get('mean_children', 0):.2f} children")

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    for i, (name, run) in enumerate(runs.items()):
        steps = [r["step"] for r in run["steps"]]
        axes[0].plot(steps, [r.get("children", 0) for r in run["steps"]], color=f"C{i}", label=name)
        share = [(r["step"], r["spawn_share"]) for r in run["steps"] if "spawn_share" in r]
        if share:
            axes[1].plot(*zip(*share), color=f"C{i}", label=name)
    axes[0].set_ylabel("children per rollout")
    axes[1].set_ylabel("share of rollouts that spawn")
    axes[1].set_ylim(-0.02, 1.02)
    for ax in axes:
        ax.set_xlabel("RL step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "rl_choices.png", dpi=120)
    plt.close(fig)
    (out / "rl_choices.json").write_text(json.dumps(
        {name: {k: run[k] for k in ("dir", "windows", "validation")} for name, run in runs.items()}, indent=1) + "\n")
    print(f"wrote {out / 'rl_choices.json'} and {out / 'rl_choices.png'}")


if __name__ == "__main__":
    main()
