"""Does an APR parent spawn when its prompt asks it to? Teacher-forced spawn probabilities by root nodes listed.

Usage::

    python experiments/probe_spawn.py --ckpt runs/m3c/apr_from_sosp31 --data runs/m3c/data --n 120 \
        --out runs/m3c/probe_spawn.json

On the first ``--n`` validation APR sequences (parent first calls that spawn; children and continuation calls
are skipped), at each line of the root expansion where the demonstration either lists another node or
spawns, the model's probability of ``<Calling Sub Searches>`` and of ``Exploring Operation: ``, grouped by
the number ``k`` of nodes listed so far and by what the demonstration does there (see
:func:`apr_jax.train.probe.spawn_hazard`). With the ``Sub Call Budget: n`` prefix in the data, a model that
counts gives a high spawn probability on the "stop" side and a low one on the "go" side of the same ``k``.
Prints a table and writes it as JSON. Also, at the point where each demonstration spawns, what the model would
write instead (:func:`apr_jax.train.probe.spawn_point`): the spawn, the join marker ``<Sub Searches>`` (which a
parent must never write itself), ``Moving to Node #`` (searching on serially) or another root node.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _evals import ROOT  # noqa: F401  (puts the checkout on sys.path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="an APR training run folder")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    p.add_argument("--data", required=True, help="the data folder the run was trained on")
    p.add_argument("--n", type=int, default=120, help="validation APR sequences to read")
    p.add_argument("--out", required=True, help="JSON output")
    args = p.parse_args()
    from apr_jax.inference.evaluate import load_run_model
    from apr_jax.train.probe import model_log_probs, spawn_hazard, spawn_point, validation_sequences

    cfg, params, tok = load_run_model(args.ckpt, step=args.step)
    log_probs, seqs = model_log_probs(cfg, params), validation_sequences(args.data, "apr", args.n)
    table = spawn_hazard(log_probs, tok, seqs)
    at_spawn = spawn_point(log_probs, tok, seqs)
    print(f"{'k':>3} {'side':>5} {'n':>4} {'p(spawn)':>9} {'p(explore)':>10}")
    for k, sides in table.items():
        for side, cell in sides.items():
            print(f"{k:>3} {side:>5} {cell['n']:>4} {cell['p_spawn']:>9.3f} {cell['p_explore']:>10.3f}")
    print(f"at the spawn point ({at_spawn['n']} parents): " +
          ", ".join(f"{word.strip()!r} {p:.3f}" for word, p in at_spawn.items() if word != "n"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"ckpt": args.ckpt, "step": args.step, "n": args.n,
                                          "by_nodes_listed": table, "at_spawn_point": at_spawn}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
