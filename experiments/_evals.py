"""Shared helpers of the experiment scripts: resumable evaluations of run folders, JSON and PNG output."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the scripts run from a checkout without installing it too
    sys.path.insert(0, str(ROOT))

import matplotlib  # noqa: E402

matplotlib.use("Agg")


def common_args(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", required=True, help="folder for evaluation results, the JSON of numbers and the PNG")
    p.add_argument("--problems", type=int, default=32, help="validation problems per evaluation point")
    p.add_argument("--slots", type=int, default=32, help="threads the engine decodes at once")
    p.add_argument("--aid", choices=("none", "arithmetic", "spawn", "arithmetic+spawn"), default="none",
                   help="labelled decoding aid (see apr_jax.inference.aid); say which in anything you publish")
    p.add_argument("--backend", help="URL of a completions server (SGLang, apr-jax serve) holding the run's exported "
                                     "model, instead of the in-process engine (--slots = requests in flight)")
    p.add_argument("--sub-call-budget", type=int,
                   help="conditioning prefix 'Sub Call Budget: N' on every APR prompt (for APR runs trained with "
                        "data.condition_prefix; experiments that vary it say so)")
    p.add_argument("--quiet", action="store_true")
    return p


def evaluate(run_dir: str, name: str, args, *, mode: str, context: int | None = None, samples: int = 1,
             temperature: float = 0.0, max_children: int = 16, sub_call_budget: int | None = None,
             problems: list | None = None, slots: int | None = None) -> dict:
    """Evaluate ``run_dir`` into ``OUT/eval/NAME.jsonl`` (skipped when its summary exists; resumes a partial
    run) and return the summary."""
    from apr_jax.inference import evaluate as ev
    from apr_jax.inference.runtime import Budgets, RunConfig
    from apr_jax.inference.sampling import Sampling

    out = Path(args.out) / "eval" / f"{name}.jsonl"
    summary_path = out.with_suffix(".summary.json")
    if summary_path.exists():
        return json.loads(summary_path.read_text())
    model_cfg, params, tok = ev.load_run_model(run_dir)
    if problems is None:
        problems = ev.load_problems(run_dir, None, args.problems)
    if sub_call_budget is None and mode == "apr":
        sub_call_budget = getattr(args, "sub_call_budget", None)
    run = RunConfig(mode=mode, samples=samples, sub_call_budget=sub_call_budget,
                    budgets=Budgets(max_children=max_children))
    _, summary = ev.evaluate(model_cfg, params, tok, problems, run, slots=slots or args.slots, context=context,
                             sampling=Sampling(temperature=temperature), out=out, progress=not args.quiet,
                             aid=args.aid, backend=args.backend)
    return summary


def paired(args, name_a: str, name_b: str) -> dict:
    """Evaluations ``name_a`` and ``name_b`` (of the same problems) compared problem by problem: counts, 95%
    Wilson intervals and the exact McNemar p-value (:mod:`apr_jax.compare`)."""
    import dataclasses

    from apr_jax import compare

    files = [Path(args.out) / "eval" / f"{name}.jsonl" for name in (name_a, name_b)]
    return dataclasses.asdict(compare.paired(compare.read(files[0]), compare.read(files[1]), (name_a, name_b)))


def write_json(args, name: str, numbers: dict) -> Path:
    path = Path(args.out) / f"{name}.json"
    path.write_text(json.dumps({"aid": args.aid, **numbers}, indent=1) + "\n")
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return path
