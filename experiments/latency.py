"""Experiment 3 (the paper's Fig. 6 analogue): accuracy vs sequential tokens and vs wall-clock latency.

Each problem is solved *alone* on the engine (its children still decode as one batch), so its wall time is
the latency a user would see on this machine; the knob is the context per thread. Per point: accuracy,
mean sequential (critical-path) tokens, mean and p90 wall seconds per problem.

    python experiments/latency.py --sosp runs/demo/sft_sosp --apr runs/demo/sft_apr --contexts 512,1024,2048 \\
        --problems 16 --aid arithmetic --out runs/exp_latency

With ``--backend URL`` every thread is decoded by a completions server instead (SGLang on a GPU: the paper's
Fig. 6 protocol; ``experiments/latency_sglang.py`` is this script with the backend required).
"""

from _evals import common_args, evaluate, write_json


def main(require_backend: bool = False) -> None:
    p = common_args(__doc__.splitlines()[0])
    p.add_argument("--sosp", help="SoS+ run folder")
    p.add_argument("--apr", help="APR run folder")
    p.add_argument("--contexts", default="512,1024,2048")
    args = p.parse_args()
    if require_backend and not args.backend:
        p.error("--backend URL is required (the URL of the SGLang server holding the exported checkpoint)")
    from pathlib import Path

    import numpy as np

    from apr_jax.inference import evaluate as ev
    from apr_jax.report import plot_latency, read_results

    if not args.sosp and not args.apr:
        p.error("give --sosp RUN and/or --apr RUN")
    rows, points = [], {"SoS+": [], "APR": []}
    for method, run_dir, label in (("sosp", args.sosp, "SoS+"), ("apr", args.apr, "APR")):
        if not run_dir:
            continue
        problems = ev.load_problems(run_dir, None, args.problems)
        for ctx in (int(c) for c in args.contexts.split(",")):
            walls, summaries = [], []
            for i, prob in enumerate(problems):  # one problem at a time: latency, not throughput
                name = f"{method}_ctx{ctx}_p{i}"
                s = evaluate(run_dir, name, args, mode=method, context=ctx, problems=[prob],
                             slots=args.slots if args.backend else 16)
                summaries.append(s)
                walls.append(read_results(Path(args.out) / "eval" / f"{name}.jsonl")[0]["wall_s"])
            acc = float(np.mean([s["accuracy"] for s in summaries]))
            seq = float(np.mean([s["mean_sequential_tokens"] for s in summaries]))
            rows.append({"method": method, "context": ctx, "accuracy": acc, "mean_sequential_tokens": seq,
                         "mean_wall_s": float(np.mean(walls)), "p90_wall_s": float(np.percentile(walls, 90))})
            points[label].append((seq, float(np.mean(walls)), acc))
    plot_latency(Path(args.out) / "latency.png", points)
    write_json(args, "latency", {"rows": rows, "backend": args.backend or "in-process",
                                 "paper": {"apr_at_5s": 0.752, "sosp_at_5s": 0.573}})


if __name__ == "__main__":
    main()
