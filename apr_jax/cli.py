"""Command line: ``apr-jax <stage> --preset NAME [overrides]``. Thin: parse, load a preset, call one stage."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from apr_jax import presets


def _add_preset(p: argparse.ArgumentParser, default: str = "mini") -> None:
    p.add_argument("--preset", default=default, choices=presets.PRESET_NAMES, help="preset (default %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.FIELD=VALUE",
                   help="override any preset field, e.g. --set data.max_num=50 (repeatable)")


def _apply_sets(preset: presets.Preset, sets: list[str]) -> presets.Preset:
    for item in sets:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise SystemExit(f"--set expects STAGE.FIELD=VALUE, got {item!r}")
        lhs, value = item.split("=", 1)
        stage, field = lhs.split(".", 1)
        if stage not in ("data", "model", "train") or getattr(preset, stage) is None:
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


def cmd_info(args) -> int:
    preset = _apply_sets(presets.load(args.preset), args.set)
    for stage in ("data", "model", "train"):
        cfg = getattr(preset, stage)
        if cfg is not None:
            print(f"[{stage}] {cfg}")
    if preset.model is not None:
        print(f"model parameters: {preset.model.num_params():,} "
              f"({preset.model.num_non_embedding_params() / 1e6:.1f}M non-embedding)")
    return 0


def cmd_demo(args) -> int:
    """The main job on a preset: data now; SFT, evaluation and RL join as they land."""
    from apr_jax.data import datasets

    preset = _apply_sets(presets.load(args.preset), args.set)
    out = Path(args.out)
    t0 = time.perf_counter()
    print(f"apr-jax demo: preset {preset.name} -> {out.resolve()}")
    print("[1/1] data")
    manifest = datasets.generate(preset.data, out / "data", workers=args.workers or os.cpu_count() or 1,
                                 progress=not args.quiet)
    _print_data_summary(manifest, str(out / "data"))
    print(f"demo finished in {time.perf_counter() - t0:.1f} s; outputs under {out.resolve()}")
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

    p = sub.add_parser("import", help="import the official release's JSON files of one split")
    p.add_argument("--out", required=True)
    p.add_argument("--split", choices=("train", "val"), required=True)
    p.add_argument("--problems")
    p.add_argument("--sosp")
    p.add_argument("--apr")
    p.add_argument("--number-mode", choices=("digits", "integers"), default="digits")
    p.set_defaults(fn=cmd_import)

    p = sub.add_parser("info", help="print a preset's configs and parameter counts")
    _add_preset(p)
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("demo", help="the main job: the whole pipeline on a preset")
    _add_preset(p)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"apr-jax {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
