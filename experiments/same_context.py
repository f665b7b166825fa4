"""Experiment 1 (the paper's Fig. 4b analogue): APR vs SoS+ when every thread has the same context window.

For each context size, SoS+ (one serial thread) and APR (every call, parent or child, limited to the same
size) are evaluated greedily on the same validation problems (each APR point is paired with SoS+ at its context:
``vs_sosp`` holds the exact McNemar p-value and Wilson intervals, ``apr_jax.compare``); APR also with several child-count limits
(children past the limit are not run and join as failed), or, for an APR run trained with the child-count
prefix (``data.condition_prefix``), with several ``Sub Call Budget: n`` prompts (``--sub-call-budgets``).

    python experiments/same_context.py --sosp runs/demo/sft_sosp --apr runs/demo/sft_apr \\
        --contexts 512,1024,2048 --children 2,4,16 --problems 32 --aid arithmetic --out runs/exp_context
"""

from _evals import common_args, evaluate, paired, write_json


def main() -> None:
    p = common_args(__doc__.splitlines()[0])
    p.add_argument("--sosp", required=True, help="SoS+ SFT (or RL) run folder")
    p.add_argument("--apr", required=True, help="APR SFT (or RL) run folder")
    p.add_argument("--contexts", default="512,1024,2048", help="tokens per thread, comma-separated")
    p.add_argument("--children", default="16", help="APR child-count limits, comma-separated")
    p.add_argument("--sub-call-budgets", default="",
                   help="instead of --children: APR child counts asked for with the prefix 'Sub Call Budget: n' "
                        "(APR runs trained with data.condition_prefix), comma-separated")
    args = p.parse_args()
    from pathlib import Path

    from apr_jax.report import plot_context

    contexts = [int(c) for c in args.contexts.split(",")]
    children = [int(c) for c in args.children.split(",")]
    budgets = [int(c) for c in args.sub_call_budgets.split(",") if c]
    rows, points = [], {"SoS+": []}
    for ctx in contexts:
        s = evaluate(args.sosp, f"sosp_ctx{ctx}", args, mode="sosp", context=ctx)
        rows.append({"method": "sosp", "context": ctx, "accuracy": s["accuracy"], "problems": s["problems"],
                     "mean_total_tokens": s["mean_total_tokens"]})
        points["SoS+"].append((ctx, s["accuracy"], s["problems"]))
        for k in budgets or children:
            if budgets:
                name, label, knob = f"apr_ctx{ctx}_budget{k}", f"APR (Sub Call Budget {k})", {"sub_call_budget": k}
                s = evaluate(args.apr, name, args, mode="apr", context=ctx, sub_call_budget=k)
            else:
                name, label, knob = f"apr_ctx{ctx}_children{k}", f"APR (<= {k} children)", {"max_children": k}
                s = evaluate(args.apr, name, args, mode="apr", context=ctx, max_children=k)
            rows.append({"method": "apr", "context": ctx, **knob, "accuracy": s["accuracy"],
                         "problems": s["problems"], "mean_total_tokens": s["mean_total_tokens"],
                         "mean_children": s["mean_children"], "vs_sosp": paired(args, name, f"sosp_ctx{ctx}")})
            points.setdefault(label, []).append((ctx, s["accuracy"], s["problems"]))
    plot_context(Path(args.out) / "same_context.png", points, aid=args.aid)
    write_json(args, "same_context", {"rows": rows, "paper": {"apr_rl_4k": 0.834, "sosp_rl_4k": 0.600}})


if __name__ == "__main__":
    main()
