"""Command line: ``apr-jax <stage> --preset NAME [overrides]``. Thin: parse, load a preset, call one stage."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from apr_jax import presets
from apr_jax.inference.aid import AIDS


def _add_preset(p: argparse.ArgumentParser, default: str = "mini", more: str = "") -> None:
    p.add_argument("--preset", default=default, choices=presets.PRESET_NAMES, help="preset (default %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.FIELD=VALUE",
                   help=f"override any preset field, e.g. --set data.max_num=50 (repeatable){more}")


def _apply_sets(preset: presets.Preset, sets: list[str]) -> presets.Preset:
    for item in sets:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise SystemExit(f"--set expects STAGE.FIELD=VALUE, got {item!r}")
        lhs, value = item.split("=", 1)
        stage, field = lhs.split(".", 1)
        if stage not in ("data", "model", "train", "rl") or getattr(preset, stage) is None:
            raise SystemExit(f"--set: preset {preset.name!r} has no stage {stage!r}")
        preset = dataclasses.replace(preset, **{stage: presets.override(getattr(preset, stage), **{field: value})})
    return preset


def _data_preset(args) -> presets.Preset:
    preset = _apply_sets(presets.load(args.preset), args.set)
    data = presets.override(preset.data, num_train=args.num_train, num_val=args.num_val, seed=args.seed,
                            number_mode=args.number_mode)
    return dataclasses.replace(preset, data=data)


def cmd_data(args) -> int:
    from apr_jax.data import datasets

    preset = _data_preset(args)
    workers = args.workers or os.cpu_count() or 1
    print(f"apr-jax data: preset {preset.name}, {preset.data.num_train:,} train + {preset.data.num_val:,} val "
          f"problems, {workers} workers -> {args.out}")
    manifest = datasets.generate(preset.data, args.out, workers=workers, progress=not args.quiet)
    _print_data_summary(manifest, args.out)
    return 0


def cmd_problems(args) -> int:
    from apr_jax.countdown.problems import heldout_problems, split_keys
    from apr_jax.data.config import DataConfig
    from apr_jax.data.datasets import atomic_write_text, dumps, read_jsonl

    data = Path(args.data)
    if not (data / "config.json").exists():
        raise ValueError(f"{data} holds no config.json: pass a folder written by `apr-jax data`")
    try:
        cfg = DataConfig(**json.loads((data / "config.json").read_text()))
    except (TypeError, json.JSONDecodeError) as err:  # a hand-edited or foreign config.json
        raise ValueError(f"{data / 'config.json'} is not a data config of `apr-jax data`: {err}") from err
    if args.split in ("train", "val"):
        raise ValueError(f"--split {args.split!r} is one of the dataset's own splits: name a new one, e.g. test")
    taken: set = set()
    for path in sorted(data.glob("problems_*.jsonl")):
        taken |= split_keys(read_jsonl(path))
    seed = cfg.seed if args.seed is None else args.seed
    problems = heldout_problems(cfg.problem_spec(), seed, args.split, args.n, taken)
    atomic_write_text(Path(args.out), "".join(dumps(p) + "\n" for p in problems))
    print(f"{len(problems):,} {args.split} problems ({cfg.num_inputs} numbers in 1..{cfg.max_num}, targets "
          f"{cfg.min_target}..{cfg.max_target}, seed {seed}), none among the {len(taken):,} of {data}'s "
          f"splits -> {args.out} (evaluate with `apr-jax eval --problems {args.out}`)")
    return 0


def _print_data_summary(manifest: dict, out: str) -> None:
    t = manifest["timing"]
    print(f"done in {t['total_s']:.1f} s ({t['problems_per_s']:.1f} problems/s with {t['workers']} workers; "
          f"problems {t['problems_s']:.1f} s, demonstrations + tokens {t['demonstrations_s']:.1f} s)")
    for split, stats in manifest["stats"].items():
        s, a = stats["sosp"], stats["apr"]
        print(f"  {split}: SoS+ {s['demonstrations']:,} demos, solved {s['solved_fraction']:.1%}, "
              f"{s['mean_tokens_per_demonstration']:.0f} tokens/demo | APR {a['demonstrations']:,} demos "
              f"({a['sequences']:,} sequences), solved {a['solved_fraction']:.1%}, "
              f"{a['mean_tokens_per_demonstration']:.0f} tokens/demo, longest call "
              f"{a.get('mean_longest_call_tokens', 0):.0f}, children {a.get('mean_children', 0):.1f}")
    print(f"files: {Path(out).resolve()} (manifest.json, tokenizer.json, problems_*.jsonl, sosp_*.jsonl, "
          f"apr_*.jsonl, arrays/)")


def cmd_import(args) -> int:
    from apr_jax.data import datasets

    report = datasets.import_official(args.out, args.split, problems=args.problems, sosp=args.sosp, apr=args.apr,
                                      number_mode=args.number_mode)
    print(json.dumps({k: v for k, v in report.items() if k != "rejected"}))
    for r in report["rejected"]:
        print(f"rejected {r['file']}[{r['index']}]: {r['reason']}", file=sys.stderr)
    return 0


def cmd_train(args) -> int:
    from apr_jax.train import sft

    preset = _apply_sets(presets.load(args.preset), args.set)
    changes = {k: v for k, v in (("steps", args.steps), ("epochs", args.epochs), ("batch_size", args.batch_size),
                                 ("seed", args.seed)) if v is not None}
    if args.steps is not None:
        changes["epochs"] = None
    if args.epochs is not None:
        changes["steps"] = None
    train_cfg = dataclasses.replace(preset.train, **changes)
    summary = sft.train(preset.model, train_cfg, args.data, args.method, args.out, resume=args.resume,
                        preset=preset.name, init_from=args.init, init_step=args.init_step)
    print(json.dumps(summary, indent=1, default=str))
    return 0


def cmd_export(args) -> int:
    from apr_jax.export import hf
    from apr_jax.train.checkpoint import load_run

    model_cfg, params = load_run(args.ckpt, step=args.step)
    tokenizer = Path(args.ckpt) / "tokenizer.json"
    out = hf.export_hf(model_cfg, params, args.out, tokenizer_json_path=tokenizer if tokenizer.exists() else None)
    print(f"exported {args.ckpt} -> {Path(out if out else args.out).resolve()}")
    return 0


def cmd_eval(args) -> int:
    """Accuracy of a run on problems, decoded by the slot engine in APR, SoS+ or self-consistency mode."""
    from apr_jax.inference import evaluate as ev
    from apr_jax.inference.runtime import Budgets, RunConfig
    from apr_jax.inference.sampling import Sampling

    model_cfg, params, tok = ev.load_run_model(args.ckpt, step=args.step)
    problems = ev.load_problems(args.ckpt, args.problems, args.n_problems)
    run = RunConfig(mode=args.mode, samples=args.samples, seed=args.seed, sub_call_budget=args.sub_call_budget,
                    token_budget=args.token_budget,
                    budgets=Budgets(max_children=args.max_children, max_spawns=args.max_spawns,
                                    max_total_tokens=args.max_total_tokens))
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k)
    _, summary = ev.evaluate(model_cfg, params, tok, problems, run, slots=args.slots, context=args.context,
                             sampling=sampling, out=args.out, keep_tokens=args.keep_tokens,
                             progress=not args.quiet, aid=args.aid, backend=args.backend, timeout=args.timeout,
                             kv_dtype=args.kv_dtype)
    aided = "" if args.aid == "none" else f" [decoding aid: {args.aid}]"
    print(f"{args.mode}{aided}: accuracy {summary['accuracy']:.1%} on {summary['problems']} problems"
          + (f" (pass@{args.samples} {summary['pass_at_n']:.1%})" if args.mode == "sc" else "")
          + f"; tokens/problem {summary['mean_total_tokens']:.0f} total, {summary['mean_sequential_tokens']:.0f} "
          f"sequential; children {summary['mean_children']:.2f}"
          + (f" (a child found a verified path in {summary['child_solved']:.1%})" if "child_solved" in summary else "")
          + f"; {summary['wall_s']:.1f} s "
          f"({summary['generated_tokens_per_s']:.0f} generated tokens/s) -> {args.out}", file=sys.stderr)
    print(json.dumps(summary))
    return 0


def cmd_rl(args) -> int:
    """GRPO from an SFT run (its method, model, tokenizer and data) into a new run folder."""
    from apr_jax.rl import grpo
    from apr_jax.rl.config import METHOD_KL_BETA
    from apr_jax.train.checkpoint import read_run_config

    preset = presets.load(args.preset)
    method = read_run_config(args.init)["method"]
    cfg = dataclasses.replace(preset.rl, kl_beta=METHOD_KL_BETA[method])
    preset = _apply_sets(dataclasses.replace(preset, rl=cfg), args.set)
    cfg = presets.override(preset.rl, steps=args.steps, problems_per_step=args.problems_per_step,
                           group_size=args.group_size, seed=args.seed)
    loop = grpo.LoopConfig(slots=args.slots, micro_batch=args.micro_batch, context=args.context,
                           max_total_tokens=args.max_total_tokens, eval_every=args.eval_every,
                           eval_problems=args.eval_problems, ckpt_every=args.ckpt_every, aid=args.aid,
                           sub_call_budget=args.sub_call_budget, token_budget=args.token_budget,
                           save_rollouts=args.save_rollouts)
    summary = grpo.train(args.init, args.out, cfg, loop, resume=args.resume, progress=not args.quiet)
    print(json.dumps(summary, default=str))
    return 0


def cmd_serve(args) -> int:
    """The engine of a run behind an OpenAI-compatible completions API (continuous batching across requests)."""
    from apr_jax.inference.sampling import Sampling
    from apr_jax.inference.server import serve_run

    serve_run(args.ckpt, host=args.host, port=args.port, slots=args.slots, context=args.context,
              sampling=Sampling(temperature=args.temperature, top_k=args.top_k), step=args.step)
    return 0


def cmd_view(args) -> int:
    from apr_jax.inference import viewer

    path = viewer.write_view(args.result, args.problem, args.out)
    print(f"wrote {Path(path).resolve()}")
    return 0


def cmd_compare(args) -> int:
    """Paired comparison of two evaluations on the problems both hold (apr_jax.compare)."""
    from apr_jax import compare

    p = compare.paired(compare.read(args.a), compare.read(args.b), (args.a, args.b))
    print("\n".join(compare.TABLE_HEADER + [compare.table_row(f"{args.a} vs {args.b}", p)]))
    verdict = "told apart" if p.p_value < args.alpha else "not told apart"
    print(f"A {100 * p.a_accuracy:.1f}% vs B {100 * p.b_accuracy:.1f}% on {p.n} problems: {p.a_only} solved by A "
          f"only, {p.b_only} by B only; p = {p.p_value:.3g}, {verdict} at {args.alpha}")
    return 0


def cmd_info(args) -> int:
    preset = _apply_sets(presets.load(args.preset), args.set)
    for stage in ("data", "model", "train", "rl"):
        cfg = getattr(preset, stage)
        if cfg is not None:
            print(f"[{stage}] {cfg}")
    if preset.model is not None:
        print(f"model parameters: {preset.model.num_params():,} "
              f"({preset.model.num_non_embedding_params() / 1e6:.1f}M non-embedding)")
    return 0


def cmd_demo(args) -> int:
    """The main job: data -> SFT SoS+ and APR -> evaluations -> GRPO -> evaluations -> report, resumable."""
    from apr_jax import demo

    plan_sets = [item for item in args.set if item.startswith("plan.")]
    preset = _apply_sets(presets.load(args.preset), [item for item in args.set if item not in plan_sets])
    plan = demo.PLANS["quick" if args.quick else "full"]
    for item in plan_sets:
        if "=" not in item:
            raise SystemExit(f"--set expects plan.FIELD=VALUE, got {item!r}")
        field, value = item[len("plan."):].split("=", 1)
        if field in ("name", "estimates_s"):
            raise SystemExit(f"--set: the plan's {field!r} cannot be set")
        try:
            plan = presets.override(plan, **{field: value})
        except ValueError as err:
            raise SystemExit(f"--set {item}: {err}") from err
    out = args.out or ("runs/demo_quick" if args.quick else "runs/demo")
    print(f"apr-jax demo: preset {preset.name}, {plan.name} plan -> {Path(out).resolve()}")
    demo.Demo(preset, plan, out, workers=args.workers, progress=not args.quiet).run()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apr-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="generate problems, SoS+ and APR demonstrations, tokenizer and arrays")
    _add_preset(p)
    p.add_argument("--out", required=True, help="output folder (a killed run resumes in the same folder)")
    p.add_argument("--num-train", type=int)
    p.add_argument("--num-val", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--number-mode", choices=("digits", "integers"))
    p.add_argument("--workers", type=int, default=0, help="processes (default: all cores); never changes output")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_data)

    p = sub.add_parser("problems", help="a held-out problem file disjoint from a dataset's splits (e.g. a test set)")
    p.add_argument("--data", required=True, help="a folder written by `apr-jax data` (its task and seed)")
    p.add_argument("--split", default="test", help="name of the new split; it seeds the draws (default %(default)s)")
    p.add_argument("--n", type=int, required=True, help="number of problems")
    p.add_argument("--seed", type=int, help="root seed (default: the dataset's)")
    p.add_argument("--out", required=True, help="JSON Lines file of problems for `apr-jax eval --problems`")
    p.set_defaults(fn=cmd_problems)

    p = sub.add_parser("import", help="import the official release's JSON files of one split")
    p.add_argument("--out", required=True)
    p.add_argument("--split", choices=("train", "val"), required=True)
    p.add_argument("--problems")
    p.add_argument("--sosp")
    p.add_argument("--apr")
    p.add_argument("--number-mode", choices=("digits", "integers"), default="digits")
    p.set_defaults(fn=cmd_import)

    p = sub.add_parser("train", help="supervised fine-tuning on a dataset's token arrays")
    _add_preset(p)
    p.add_argument("--method", choices=("apr", "sosp"), required=True)
    p.add_argument("--data", required=True, help="a folder written by `apr-jax data`")
    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics, loss.png)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--init", help="start from the parameters of this run folder's checkpoint (fresh optimizer and "
                   "schedule; same model config and vocabulary), e.g. an APR model from an SoS+ one")
    p.add_argument("--init-step", type=int, help="the --init checkpoint's step (default: its newest)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps (replaces the preset's steps or epochs)")
    length.add_argument("--epochs", type=float, help="passes over the training set, converted to steps")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    _add_distributed(p)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("export", help="write a run's parameters as a Hugging Face Llama directory")
    p.add_argument("--ckpt", required=True, help="run folder")
    p.add_argument("--out", required=True)
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("eval", help="accuracy of a run on problems: APR, SoS+ or self-consistency on the engine")
    p.add_argument("--ckpt", required=True, help="run folder")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    p.add_argument("--mode", choices=("apr", "sosp", "sc"), required=True,
                   help="apr: thread trees; sosp: one serial thread; sc: --samples SoS+ samples, majority vote")
    p.add_argument("--n-problems", type=int, default=200)
    p.add_argument("--problems", help="JSON or JSONL list of problems with nums and target (default: the "
                   "run's validation split)")
    p.add_argument("--samples", type=int, default=1, help="samples per problem (sc mode)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = whole vocabulary")
    p.add_argument("--seed", type=int, default=0, help="thread keys derive from (seed, problem id, thread path)")
    p.add_argument("--slots", type=int, default=16, help="threads decoded at once")
    p.add_argument("--context", type=int, help="tokens per thread (default: the model's context)")
    p.add_argument("--max-children", type=int, default=16, help="children run per spawn; more join as failed")
    p.add_argument("--max-spawns", type=int, default=8, help="spawns per problem; another ends the problem")
    p.add_argument("--max-total-tokens", type=int, help="tokens per problem over all threads (default: no cap)")
    p.add_argument("--sub-call-budget", type=int, help="APR conditioning prefix 'Sub Call Budget: N'")
    p.add_argument("--token-budget", type=int, help="SoS+ conditioning prefix 'Token Budget: N'")
    p.add_argument("--backend", help="URL of an OpenAI-compatible completions server (SGLang, apr-jax serve) to "
                                      "decode on instead of the in-process engine; --slots = requests in flight")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request to --backend")
    p.add_argument("--aid", choices=AIDS, default="none",
                   help="labelled decoding aid: 'arithmetic' lets the runtime write operation results and resulting "
                        "lists (the model still chooses the search); 'spawn' (APR) ends a parent's root expansion "
                        "with a spawn block once it lists --sub-call-budget nodes; reported beside plain results, "
                        "never instead")
    p.add_argument("--keep-tokens", action="store_true",
                   help="also save prompt/output token ids and log-probs per thread")
    p.add_argument("--kv-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="KV cache entries: float32 (exact) or bfloat16 (half the cache memory; log-probs rounded)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="per-problem results (JSON Lines; summary beside it)")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("rl", help="GRPO through whole thread trees, starting from an SFT run")
    _add_preset(p)
    p.add_argument("--init", required=True, help="the SFT run folder to start from (and keep as reference)")
    p.add_argument("--out", required=True, help="RL run folder (checkpoints, metrics.jsonl, rl.png)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--steps", type=int)
    p.add_argument("--problems-per-step", type=int)
    p.add_argument("--group-size", type=int, help="rollouts per problem (G)")
    p.add_argument("--seed", type=int)
    p.add_argument("--slots", type=int, default=16, help="threads decoded at once")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per update micro-batch")
    p.add_argument("--context", type=int, help="tokens per thread (default: the model's context)")
    p.add_argument("--max-total-tokens", type=int, help="per-problem token budget of a rollout")
    p.add_argument("--aid", choices=AIDS, default="none",
                   help="decoding aid of rollouts and validation (forced tokens carry no loss)")
    p.add_argument("--sub-call-budget", type=int,
                   help="APR conditioning prefix 'Sub Call Budget: N' on rollouts and validation")
    p.add_argument("--token-budget", type=int, help="SoS+ conditioning prefix 'Token Budget: N'")
    p.add_argument("--eval-every", type=int, default=10, help="greedy validation every N steps (0: never)")
    p.add_argument("--eval-problems", type=int, default=200)
    p.add_argument("--ckpt-every", type=int, default=5)
    p.add_argument("--save-rollouts", action="store_true",
                   help="write each step's rollouts (texts, rewards, advantages, choices) to OUT/rollouts/")
    p.add_argument("--quiet", action="store_true")
    _add_distributed(p)
    p.set_defaults(fn=cmd_rl)

    p = sub.add_parser("view", help="draw one problem's thread tree and slot timeline (HTML or PNG)")
    p.add_argument("result", help="a results file written by `apr-jax eval`")
    p.add_argument("--problem", type=int, default=0, help="problem id (default 0)")
    p.add_argument("--out", required=True, help="FILE.html or FILE.png")
    p.set_defaults(fn=cmd_view)

    p = sub.add_parser("compare", help="are two evaluations' accuracies told apart? paired, on the same problems")
    p.add_argument("a", help="a results file written by `apr-jax eval` (A)")
    p.add_argument("b", help="another, of the same problems (B)")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of the verdict line")
    p.set_defaults(fn=cmd_compare)

    p = sub.add_parser("info", help="print a preset's configs and parameter counts")
    _add_preset(p)
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("serve", help="serve a run on an OpenAI-compatible /v1/completions API")
    p.add_argument("--ckpt", required=True, help="run folder")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000, help="0 = any free port (printed)")
    p.add_argument("--slots", type=int, default=32, help="threads decoded at once across all requests")
    p.add_argument("--context", type=int, help="tokens per request (default: the model's context)")
    p.add_argument("--temperature", type=float, default=0.0, help="the server's sampling (requests must match)")
    p.add_argument("--top-k", type=int, default=0)
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("demo", help="the main job: the whole pipeline on a preset")
    _add_preset(p, default="mini3", more="; also plan.FIELD=VALUE for any field of the demo's plan "
                                          "(apr_jax.demo.Plan), e.g. --set plan.apr_sft_steps=900")
    p.add_argument("--out", help="output folder (default runs/demo, or runs/demo_quick with --quick); a rerun "
                                  "skips finished stages and resumes the interrupted one")
    p.add_argument("--quick", action="store_true", help="same stages, small numbers: minutes instead of hours")
    p.add_argument("--workers", type=int, default=0, help="data-generation processes (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_demo)
    return parser


def _add_distributed(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-host (jax.distributed; or APR_JAX_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID)")
    g.add_argument("--coordinator", help="HOST:PORT of process 0")
    g.add_argument("--num-processes", type=int)
    g.add_argument("--process-id", type=int)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # JAX's persistent compilation cache: a resumed run or a second process skips recompiling its steps
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path.home() / ".cache" / "apr_jax" / "jax"))
    try:
        if args.command in ("train", "rl"):
            from apr_jax.train import distributed

            distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        return args.fn(args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"apr-jax {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
