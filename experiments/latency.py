"""Experiment 3 (the paper's Fig. 6 analogue): accuracy vs sequential tokens and vs wall-clock latency.

Each problem is solved *alone* on the engine (its children still decode as one batch), so its wall time is
the latency a user would see on this machine; the knob is the context per thread. Per point: accuracy,
mean sequential (critical-path) tokens, mean and p90 wall seconds per problem.

    python experiments/latency.py --sosp runs/demo/sft_sosp --apr runs/demo/sft_apr --contexts 512,1024,2048 \\
        --problems 16 --aid arithmetic --out runs/exp_latency
"""

from _evals import common_args, evaluate, write_json


def main() -> None:
    p = common_args(__doc__.splitlines()[0])
    p.add_argument("--sosp", required=True)
    p.add_argument("--apr", required=True)
    p.add_argument("--contexts", default="512,1024,2048")
    args = p.parse_args()
    from pathlib import Path

    import numpy as np

    from apr_jax.inference import evaluate as ev
    from apr_jax.report import plot_latency, read_results

    rows, points = [], {"SoS+": [], "APR": []}
    for method, run_dir, label in (("sosp", args.sosp, "SoS+"), ("apr", args.apr, "APR")):
        problems = ev.load_problems(run_dir, None, args.problems)
        for ctx in (int(c) for c in args.contexts.split(",")):
            walls, summaries = [], []
            for i, prob in enumerate(problems):  # one problem at a time: latency, not throughput
                name = f"{method}_ctx{ctx}_p{i}"
                s = evaluate(run_dir, name, args, mode=method, context=ctx, problems=[prob], slots=16)
                summaries.append(s)
                walls.append(read_results(Path(args.out) / "eval" / f"{name}.jsonl")[0]["wall_s"])
            acc = float(np.mean([s["accuracy"] for s in summaries]))
            seq = float(np.mean([s["mean_sequential_tokens"] for s in summaries]))
            rows.append({"method": method, "context": ctx, "accuracy": acc, "mean_sequential_tokens": seq,
                         "mean_wall_s": float(np.mean(walls)), "p90_wall_s": float(np.percentile(walls, 90))})
            points[label].append((seq, float(np.mean(walls)), acc))
    plot_latency(Path(args.out) / "latency.png", points)
    write_json(args, "latency", {"rows": rows, "paper": {"apr_at_5s": 0.752, "sosp_at_5s": 0.573}})


if __name__ == "__main__":
    main()
