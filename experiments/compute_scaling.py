"""Experiment 2 (the paper's Fig. 4a/8 analogue): accuracy vs total tokens per problem.

SoS+ sampled at temperature 1.0 with N samples per problem gives pass@n and cons@n for n = 1..N (the first n
samples; majority vote over answers); APR is evaluated greedily under several child-count settings: the
conditioning prefix ``Sub Call Budget: n`` when the APR run was trained with it (``--sub-call-budgets``),
otherwise enforced child limits (``--children``).

    python experiments/compute_scaling.py --sosp runs/demo/sft_sosp --apr runs/demo/sft_apr --samples 8 \\
        --children 2,4,16 --problems 32 --context 2048 --aid arithmetic --out runs/exp_scaling
"""

from _evals import common_args, evaluate, write_json


def _preset(run_dir: str) -> str:
    from apr_jax.train.checkpoint import read_run_config

    return read_run_config(run_dir).get("preset") or "mini"


def main() -> None:
    p = common_args(__doc__.splitlines()[0])
    p.add_argument("--sosp", required=True)
    p.add_argument("--apr", required=True)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--children", default="2,4,16")
    p.add_argument("--sub-call-budgets", default="", help="e.g. 2,4,8,10 (APR runs trained with the prefix)")
    p.add_argument("--context", type=int, help="tokens per thread (default: the model's)")
    args = p.parse_args()
    from pathlib import Path

    from apr_jax.report import PAPER, plot_scaling, read_results, sc_curves

    name = f"sosp_sc{args.samples}"
    evaluate(args.sosp, name, args, mode="sc", samples=args.samples, temperature=1.0, context=args.context)
    curve = sc_curves(read_results(Path(args.out) / "eval" / f"{name}.jsonl"))
    apr = {}
    if args.sub_call_budgets:
        for n in (int(x) for x in args.sub_call_budgets.split(",")):
            s = evaluate(args.apr, f"apr_budget{n}", args, mode="apr", sub_call_budget=n, context=args.context)
            apr[f"APR budget {n}"] = (s["mean_total_tokens"], s["accuracy"])
    else:
        for k in (int(x) for x in args.children.split(",")):
            s = evaluate(args.apr, f"apr_children{k}", args, mode="apr", max_children=k, context=args.context)
            apr[f"APR <= {k} children"] = (s["mean_total_tokens"], s["accuracy"])
    plot_scaling(Path(args.out) / "compute_scaling.png", curve, apr, aid=args.aid, preset=_preset(args.sosp))
    write_json(args, "compute_scaling", {
        "sosp": curve, "apr": {k: {"mean_total_tokens": t, "accuracy": a} for k, (t, a) in apr.items()},
        "paper": {"sosp_pass_at_n": PAPER["sosp_pass_at_n"], "sosp_cons_at_n": PAPER["sosp_cons_at_n"],
                  "apr_at_20k_total_tokens": 0.801}})


if __name__ == "__main__":
    main()
