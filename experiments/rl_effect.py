"""Experiment 4 (the paper's Fig. 5/7 analogue): accuracy, tokens and children before vs after GRPO.

    python experiments/rl_effect.py --before runs/demo/sft_apr --after runs/demo/rl_apr --mode apr \\
        --problems 32 --context 2048 --aid arithmetic --out runs/exp_rl
"""

from _evals import common_args, evaluate, paired, write_json


def main() -> None:
    p = common_args(__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="SFT run folder")
    p.add_argument("--after", required=True, help="RL run folder started from it")
    p.add_argument("--mode", choices=("apr", "sosp"), default="apr")
    p.add_argument("--context", type=int)
    args = p.parse_args()
    from pathlib import Path

    from apr_jax.report import PAPER, plot_accuracy

    out = {}
    for stage, run_dir in (("before", args.before), ("after", args.after)):
        s = evaluate(run_dir, f"{args.mode}_{stage}", args, mode=args.mode, context=args.context)
        out[stage] = {k: s[k] for k in ("accuracy", "problems", "mean_children", "mean_total_tokens",
                                        "mean_sequential_tokens")}
    plot_accuracy(Path(args.out) / "rl_effect.png",
                  {"SFT": (out["before"]["accuracy"], None), "SFT+RL": (out["after"]["accuracy"], None)},
                  problems=out["before"]["problems"])
    out["paired"] = paired(args, f"{args.mode}_after", f"{args.mode}_before")  # is the change more than noise?
    write_json(args, "rl_effect", {**out, "paper": {"accuracy": (PAPER["apr_sft_greedy"], PAPER["apr_rl_greedy"]),
                                                    "children": PAPER["children_sft_rl"],
                                                    "tokens_per_sequence": PAPER["tokens_per_seq_sft_rl"]}})


if __name__ == "__main__":
    main()
