"""The demo's report: tables (``report.md``), numbers (``results.json``) and plots (PNG) from its evaluations.

Reference numbers are the paper's (Pan et al. 2025, "Learning Adaptive Parallel Reasoning with Language
Models", arXiv 2504.15466; 228M model, 1,000 validation problems, 4K context), printed beside ours where the
axes allow. Ours come from a CPU-sized preset, so they show direction, not the paper's levels.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

from apr_jax import compare
from apr_jax.data import datasets
from apr_jax.demo import sweep_name
from apr_jax.inference.runtime import assembly, charged_tokens, departures, majority_vote
from apr_jax.train.checkpoint import read_run_config

#: The paper's headline figures (Pan et al. 2025, Sec. 5).
PAPER = {
    "sosp_sft_greedy": 0.573,
    "apr_sft_greedy": 0.755,
    "apr_rl_greedy": 0.834,
    "sosp_rl_greedy": 0.600,
    "children_sft_rl": (6.1, 8.2),
    "tokens_per_seq_sft_rl": (1471, 1796),
    "sosp_pass_at_n": (0.573, 0.633, 0.644, 0.657, 0.665, 0.675, 0.678, 0.684),
    "sosp_cons_at_n": (0.573, 0.626, 0.630, 0.646, 0.655, 0.658, 0.666, 0.664),
}


PROBE_KINDS = (("other", "format: line openings, brackets, markers"),
               ("operator", "the operator of an explored operation"),
               ("operands", "the operands (partly the search's random choice)"),
               ("operand_in_state", "first operand is a number of the current state (copying)"),
               ("result", "the result after `=` (arithmetic)"),
               ("resulting", "the resulting list (copy the state minus operands, plus the result)"),
               ("generated", "a `Generated Node` line (copy of the line above)"),
               ("state", "a `Current State` line (retrieval of an earlier node)"))


#: What each APR-only aid of a plan's ``apr_aids`` does (:mod:`apr_jax.inference.aid`).
APR_AIDS = {"spawn": "the runtime writes the spawn block once the parent has listed as many root nodes as its "
                     "`Sub Call Budget` (enforcing the prefix); all else is the model's"}


def read_results(path: Path) -> list[dict]:
    return list(datasets.read_jsonl(path)) if path.exists() else []


def read_summary(path: Path) -> dict | None:
    s = path.with_suffix(".summary.json")
    return json.loads(s.read_text()) if s.exists() else None


def sc_curves(results: Sequence[dict]) -> list[dict]:
    """pass@n and cons@n for n = 1..N from self-consistency results (the first n samples of each problem),
    with the mean total tokens of those n samples. Votes are by the answer's operations; ties go to the
    earliest sample (as the runtime votes)."""
    if not results:
        return []
    n_max = min(len(r.get("samples", [])) for r in results)
    rows = []
    for n in range(1, n_max + 1):
        passed = consensus = tokens = 0
        for r in results:
            samples = r["samples"][:n]
            passed += any(s["correct"] for s in samples)
            win = majority_vote([s["answer"] for s in samples])
            if win is not None:
                consensus += samples[win]["correct"]
            by_path = {t["path"]: t for t in r["threads"]}
            tokens += sum(charged_tokens(by_path[f"s{i}"]) for i in range(n) if f"s{i}" in by_path)
        k = len(results)
        rows.append({"n": n, "pass_at_n": passed / k, "cons_at_n": consensus / k, "mean_total_tokens": tokens / k})
    return rows


def run_seconds(run_dir: Path) -> float:
    """Wall time a training run spent in its steps, from its metrics (also when it ran outside the demo)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return 0.0
    total, prev = 0.0, 0
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get("split") == "train" and "step_time_s" in row:
            total += row["step_time_s"] * (row["step"] - prev)
            prev = row["step"]
    return total


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _row(label: str, s: dict | None) -> str:
    if s is None:
        return f"| {label} | not run | | | | |"
    wall = s["wall_s"] / max(1, s["problems"])
    return (f"| {label} | {_pct(s['accuracy'])} ({round(s['accuracy'] * s['problems'])}/{s['problems']}) | "
            f"{s['mean_total_tokens']:.0f} | {s['mean_sequential_tokens']:.0f} | {s['mean_children']:.2f} | "
            f"{wall:.1f} |")


# The CPU presets' aim: the SoS+ model solves at least this share of held-out problems greedily at its own
# context, so that the comparisons mean something (docs/experiments.md, "The mini preset").
SOSP_AIM = 0.30


def aim_line(sosp_plain: dict | None) -> str:
    """Whether the SoS+ SFT model (its plain evaluation summary) reached ``SOSP_AIM``, with the 95% interval."""
    if sosp_plain is None:
        return f"Aim (SoS+ SFT solves at least {SOSP_AIM:.0%} plain): not evaluated."
    n = sosp_plain["problems"]
    solved = round(sosp_plain["accuracy"] * n)
    verdict = "met" if solved >= SOSP_AIM * n else "**not met**"
    return (f"Aim (SoS+ SFT solves at least {SOSP_AIM:.0%} plain): {verdict}, "
            f"{compare.format_accuracy(solved, n, compare.wilson_interval(solved, n))} of {n} problems.")


def _percent_axis(ax) -> None:
    """Accuracy axes start at 0 and show at least 0-10%, so all-zero results do not plot below zero."""
    ax.set_ylim(0, max(10.0, ax.get_ylim()[1]))


def interval_bars(accuracies: Sequence[float], problems: int | Sequence[int]) -> list[list[float]]:
    """Matplotlib ``yerr`` (percent below, percent above) of each accuracy's 95% Wilson interval over
    ``problems`` problems (one count for all, or one each)."""
    counts = [problems] * len(accuracies) if isinstance(problems, int) else list(problems)
    below, above = [], []
    for acc, n in zip(accuracies, counts):
        low, high = compare.wilson_interval(round(acc * n), n)
        below.append(100 * max(0.0, acc - low))
        above.append(100 * max(0.0, high - acc))
    return [below, above]


def plot_accuracy(path: Path, groups: dict[str, tuple[float | None, float | None]], problems: int | None = None) -> None:
    """Bars of plain (and aided) accuracy per group; with ``problems``, each with its 95% Wilson interval."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(groups))
    plain = [v[0] for v in groups.values()]
    aided = [v[1] for v in groups.values()]

    def bars(xs, accs, width, **kw):  # a group not evaluated gets no bar (not a bar at 0)
        kept = [(x_, a) for x_, a in zip(xs, accs) if a is not None]
        if not kept:
            return
        err = interval_bars([a for _, a in kept], problems) if problems else None
        ax.bar([x_ for x_, _ in kept], [100 * a for _, a in kept], width, yerr=err, capsize=3 if err else 0, **kw)

    if all(a is None for a in aided):
        bars(x, plain, 0.5)
    else:
        bars(x - 0.2, plain, 0.4, label="plain")
        bars(x + 0.2, aided, 0.4, label="arithmetic aid (labelled)")
        ax.legend()
    ax.set_xticks(x, list(groups))
    ax.set_ylabel("accuracy (%)")
    _percent_axis(ax)
    ax.set_title("Greedy accuracy" + (f" on {problems} problems, 95% intervals" if problems else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _aid_label(aid: str) -> str:
    return "plain" if aid == "none" else f"{aid} aid"


def plot_context(path: Path, points: dict[str, list[tuple]], aid: str = "arithmetic") -> None:
    """Accuracy against tokens per thread, one line per method; points are (context, accuracy) or (context,
    accuracy, problems), the latter drawn with its 95% Wilson interval."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (label, pts) in enumerate(points.items()):
        pts = sorted(pts)
        xs = [p[0] * 1.02 ** (i - (len(points) - 1) / 2) for p in pts]  # side by side, so intervals do not hide
        accs = [p[1] for p in pts]
        err = interval_bars(accs, [p[2] for p in pts]) if pts and all(len(p) > 2 for p in pts) else None
        ax.errorbar(xs, [100 * a for a in accs], yerr=err, fmt="o-", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per thread (context window)")
    ax.set_ylabel("accuracy (%)")
    _percent_axis(ax)
    ax.set_title(f"Same context window ({_aid_label(aid)}); paper at 4K: APR+RL 83.4, SoS+ +RL 60.0", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_scaling(path: Path, sc: list[dict], apr_points: dict[str, tuple[float, float]],
                 aid: str = "arithmetic", preset: str = "mini") -> None:
    import matplotlib.pyplot as plt

    fig, (ax, ref) = plt.subplots(1, 2, figsize=(11, 4))
    if sc:
        ax.plot([r["mean_total_tokens"] for r in sc], [100 * r["pass_at_n"] for r in sc], "o-", label="SoS+ pass@n")
        ax.plot([r["mean_total_tokens"] for r in sc], [100 * r["cons_at_n"] for r in sc], "s-", label="SoS+ cons@n")
    for label, (tokens, acc) in apr_points.items():
        ax.plot([tokens], [100 * acc], "*", markersize=12, label=label)
    ax.set_xlabel("mean total tokens per problem")
    ax.set_ylabel("accuracy (%)")
    _percent_axis(ax)
    ax.set_title(f"Ours ({preset}, {_aid_label(aid)}, T=1 for SoS+ samples)")
    ax.legend(fontsize=8)
    n = range(1, 9)
    ref.plot(n, [100 * v for v in PAPER["sosp_pass_at_n"]], "o--", label="SoS+ pass@n")
    ref.plot(n, [100 * v for v in PAPER["sosp_cons_at_n"]], "s--", label="SoS+ cons@n")
    ref.axhline(100 * 0.801, color="C2", ls=":", label="APR at 20K total tokens (80.1)")
    ref.set_xlabel("n (samples)")
    ref.set_title("Paper (228M, Pan et al. 2025)")
    ref.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_latency(path: Path, points: dict[str, list[tuple[float, float, float]]]) -> None:
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for label, pts in points.items():
        pts = sorted(pts)
        a.plot([p[0] for p in pts], [100 * p[2] for p in pts], "o-", label=label)
        pts = sorted(pts, key=lambda p: p[1])
        b.plot([p[1] for p in pts], [100 * p[2] for p in pts], "o-", label=label)
    a.set_xlabel("mean sequential (critical-path) tokens")
    b.set_xlabel("mean wall time per problem on this CPU (s, batched)")
    for ax in (a, b):
        ax.set_ylabel("accuracy (%)")
        _percent_axis(ax)
        ax.legend(fontsize=8)
    a.set_title("Paper: APR 75.2% vs SoS+ 57.3% at ~5 s per sample", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def assembly_table(demo, runs: Sequence[tuple[str, str]]) -> list[str]:
    """Report lines: per APR evaluation, whether the children found a verified path and what the parent made of
    it (:func:`apr_jax.inference.runtime.assembly`); no lines when no APR evaluation has results."""
    rows = []
    for key, label in runs:
        path = demo.eval_file(key)
        if not path.exists():
            continue
        results = read_results(path)
        a = assembly(results)
        where = ", ".join(f"{kind} {n}" for kind, n in departures(results).items()) or "-"
        rows.append(f"| {label} | {a['child_path']}/{a['problems']} | {a['assembled']} | {a['wrong_answer']} | "
                    f"{a['no_answer']} | {a['solved_without_child']} | {where} |")
    if not rows:
        return []
    return ["### Where APR's answers come from", "",
            "Problems where some child returned a path that verifies from the problem's numbers, and what the "
            "parent wrote after the join: an answer that verifies, a path that does not, or no answer; last "
            "columns: problems the parent solved with no verified child path, and where the parent went wrong "
            "when a child had a verified path (`apr_jax.inference.runtime.departure`): the first operation of "
            "the path it wrote after the join that is on no verified child path (operation 1 is the one into "
            "the child's node, which the parent must retrieve from its spawn or join), its operations right "
            "but a line wrong, or no path written.", "",
            "| run | a child found a verified path | parent's answer verifies | parent's path wrong | "
            "no answer | solved without such a child | where the parent went wrong |", "|---|---|---|---|---|---|---|",
            *rows, ""]


def paired_table(demo, comparisons: Sequence[tuple[str, str, str]]) -> list[str]:
    """Rows of :func:`apr_jax.compare.paired` for (label, evaluation A, evaluation B); pairs not both run are
    left out."""
    rows = []
    for label, key_a, key_b in comparisons:
        a, b = read_results(demo.eval_file(key_a)), read_results(demo.eval_file(key_b))
        if a and b:
            rows.append(compare.table_row(label, compare.paired(a, b, (key_a, key_b))))
    return rows


def write_report(demo) -> Path:
    """Write ``report.md``, ``results.json`` and the plots of a finished (or partial) demo run."""
    import matplotlib

    matplotlib.use("Agg")
    out, plan = demo.out, demo.plan
    summaries = {p.name[:-len(".summary.json")]: json.loads(p.read_text())
                 for p in sorted((out / "eval").glob("*.summary.json"))}
    get = summaries.get
    walls = {st.name: demo.done(st.name)["wall_s"] for st in demo.stages() if demo.done(st.name) is not None}
    data = demo.done("data") or {}
    manifest = demo.data_dir / "manifest.json"
    if manifest.exists():  # the data may have been made before this demo run (its own timing)
        walls["data"] = max(walls.get("data", 0.0), json.loads(manifest.read_text())["timing"]["total_s"])
    sft = {m: (demo.done(f"sft_{m}") or {}).get("summary", {}) for m in ("sosp", "apr")}
    sc = sc_curves(read_results(demo.eval_file("sc_sft_aided")))
    model = demo.preset.model

    lines = [f"# apr-jax demo report ({demo.preset.name} preset, {plan.name} plan)", "",
             "Greedy decoding on held-out validation problems unless noted. **Aided** rows use the labelled "
             "arithmetic decoding aid (`--aid arithmetic`: the runtime writes each operation's result and the "
             "resulting list, the model writes the search), applied equally to every method; **plain** rows are "
             "the models alone. Paper figures: Pan et al. 2025 (228M model, 1,000 problems).", "",
             "## Setup", "",
             f"- task: {demo.data_cfg.num_inputs} input numbers in 1..{demo.data_cfg.max_num}, targets "
             f"{demo.data_cfg.min_target}..{demo.data_cfg.max_target}, numbers as {demo.data_cfg.number_mode}; "
             f"{demo.data_cfg.num_train:,} training problems",
             f"- model: {model.num_params() / 1e6:.1f}M parameters, context {model.max_seq_len}"]
    if plan.sub_call_budget is not None:
        lines.append(f"- APR trained on demonstrations with the paper's child-count prefix and evaluated with "
                     f"`Sub Call Budget: {plan.sub_call_budget}`")
    stats = data.get("summary", {}).get("stats", {}).get("train")
    if stats:
        lines.append(f"- solver ceilings (training data solved): SoS+ {_pct(stats['sosp']['solved_fraction'])}, APR "
                     f"{_pct(stats['apr']['solved_fraction'])}; SoS+ demo {stats['sosp']['mean_tokens_per_demonstration']:.0f} "
                     f"tokens, APR longest call {stats['apr'].get('mean_longest_call_tokens', 0):.0f}")
    for m, label in (("sosp", "SoS+"), ("apr", "APR")):
        s = sft[m]
        if s:
            walls[f"sft_{m}"] = max(walls.get(f"sft_{m}", 0.0), run_seconds(demo.sft_dir(m)))
            train = "n/a" if s.get("train_loss") is None else f"{s['train_loss']:.3f}"
            val = "n/a" if s.get("val_loss") is None else f"{s['val_loss']:.3f}"
            start = " from the SoS+ model" if m == "apr" and plan.apr_from_sosp else ""
            if read_run_config(demo.sft_dir(m)).get("train", {}).get("mask_continuation_prompts"):
                start += " (no loss on continuation prompts)"
            lines.append(f"- SFT {label}{start}: {s['final_step']} steps of {plan.sft_size(m)[1]}, "
                         f"{s['tokens_seen']:,} tokens, train loss {train}, validation loss {val}, "
                         f"{walls[f'sft_{m}'] / 60:.0f} min")
    probed = (demo.done("probe_sft") or {}).get("summary")
    if probed:
        lines += ["", "## What the SFT models learned (teacher-forced)", "",
                  "Top-1 accuracy of each next token given the true prefix, by kind of token, on the first "
                  f"{probed['sosp']['sequences']} SoS+ / {probed['apr']['sequences']} APR validation sequences "
                  "(`apr_jax.train.probe`): greedy accuracy stays 0 until every one of these is near 1.", "",
                  "| kind of token | what it measures | SoS+ | APR |", "|---|---|---|---|"]
        for kind, meaning in PROBE_KINDS:
            cells = [probed[m]["kinds"].get(kind, {}).get("accuracy") for m in ("sosp", "apr")]
            lines.append(f"| {kind} | {meaning} | "
                         + " | ".join("n/a" if c is None else f"{c:.2f}" for c in cells) + " |")
    lines += ["", f"## 1. Accuracy ({plan.eval_context or model.max_seq_len} tokens per thread)", "",
              "| run | accuracy | total tokens | sequential tokens | children | wall s/problem (batched) |",
              "|---|---|---|---|---|---|"]
    for key, label in (("sosp_sft_plain", "SoS+ SFT, plain"), ("apr_sft_plain", "APR SFT, plain"),
                       ("apr_rl_plain", "APR SFT+RL, plain"), ("sosp_sft_aided", "SoS+ SFT, aided"),
                       ("apr_sft_aided", "APR SFT, aided"), ("apr_rl_aided", "APR SFT+RL, aided")):
        if key != "apr_rl_aided" or plan.rl_aided_eval:
            lines.append(_row(label, get(key)))
    for aid in plan.apr_aids:
        key = aid.replace("+", "_")
        lines += [_row(f"APR SFT, {aid} aid", get(f"apr_sft_{key}")), _row(f"APR SFT+RL, {aid} aid", get(f"apr_rl_{key}"))]
    if plan.apr_aids:
        lines += ["", "Rows with an APR-only aid: " + "; ".join(f"`{a}`: {APR_AIDS.get(a, a)}" for a in plan.apr_aids)
                  + " (labelled; not applied to SoS+, which has no spawn)."]
    lines += ["", f"Paper: SoS+ SFT {_pct(PAPER['sosp_sft_greedy'])}, APR SFT {_pct(PAPER['apr_sft_greedy'])}, "
              f"APR SFT+RL {_pct(PAPER['apr_rl_greedy'])}.", ""]
    lines += [aim_line(get("sosp_sft_plain")), "", "![accuracy](accuracy.png)", ""]
    lines += assembly_table(demo, [("apr_sft_plain", "APR SFT, plain"), ("apr_rl_plain", "APR SFT+RL, plain"),
                                   ("apr_sft_aided", "APR SFT, aided"), ("apr_rl_aided", "APR SFT+RL, aided")]
                            + [(f"apr_{st}_{aid.replace('+', '_')}", f"APR SFT{'+RL' if st == 'rl' else ''}, {aid} aid")
                               for aid in plan.apr_aids for st in ("sft", "rl")])

    budgets = list(plan.sweep_sub_call_budgets) if plan.sub_call_budget is not None else []
    apr_label = "APR" if plan.sub_call_budget is None else f"APR (Sub Call Budget {plan.sub_call_budget})"
    columns = [("sosp", "SoS+", None), ("apr", apr_label, None)] + [("apr", f"APR (Sub Call Budget {b})", b)
                                                                     for b in budgets]
    lines += ["## 2. Same context window (aided)", "",
              "Every thread (SoS+'s one, each APR call) limited to the same number of tokens"
              + (" (APR also asked for other child counts, the paper's Fig. 4b)" if budgets else "") + ".", "",
              "| context | " + " | ".join(label for _, label, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    ctx_points: dict[str, list] = {label: [] for _, label, _ in columns}
    main_ctx = plan.eval_context or model.max_seq_len
    for ctx in list(plan.sweep_contexts) + [main_ctx]:
        row = []
        for method, label, budget in columns:
            key = sweep_name(method, None if ctx == main_ctx else ctx, budget)
            s = get(key)
            row.append(_pct(s["accuracy"]) + f" (n={s['problems']})" if s else "not run")
            if s:
                ctx_points[label].append((ctx, s["accuracy"], s["problems"]))
        lines.append(f"| {ctx} | " + " | ".join(row) + " |")
    lines += ["", "Paper at 4K: APR+RL 83.4% vs SoS+ +RL 60.0%; APR with 10 children about +20 points.", "",
              "![same context](same_context.png)", ""]

    lines += ["## 3. Compute scaling: SoS+ pass@n / cons@n vs APR (aided)", "",
              "SoS+ samples at temperature 1.0; APR greedy.", "",
              "| n | SoS+ pass@n | SoS+ cons@n | mean total tokens | paper pass@n | paper cons@n |",
              "|---|---|---|---|---|---|"]
    for r in sc:
        i = r["n"] - 1
        lines.append(f"| {r['n']} | {_pct(r['pass_at_n'])} | {_pct(r['cons_at_n'])} | {r['mean_total_tokens']:.0f} | "
                     f"{_pct(PAPER['sosp_pass_at_n'][i]) if i < 8 else ''} | "
                     f"{_pct(PAPER['sosp_cons_at_n'][i]) if i < 8 else ''} |")
    apr_keys = [("apr_sft_aided", "APR SFT"), ("apr_rl_aided", "APR SFT+RL")]
    for aid in plan.apr_aids:
        key = aid.replace("+", "_")
        apr_keys += [(f"apr_sft_{key}", f"APR SFT, {aid} aid"), (f"apr_rl_{key}", f"APR SFT+RL, {aid} aid")]
    apr_points = {label: (s["mean_total_tokens"], s["accuracy"]) for key, label in apr_keys if (s := get(key))}
    for label, (tokens, acc) in apr_points.items():
        lines.append(f"\n{label}: {_pct(acc)} at {tokens:.0f} mean total tokens.")
    lines += ["", "![compute scaling](compute_scaling.png)", ""]

    lines += ["## 4. Sequential tokens and wall-clock latency (aided)", "",
              "One point per evaluation above (context sweep included); wall time is per problem while the engine "
              "decodes many problems at once on this 2-core CPU, so compare methods, not absolute seconds.", "",
              "![latency](latency.png)", ""]
    lat_points: dict[str, list] = {"SoS+": [], "APR": []}
    for key, s in summaries.items():
        if "aided" in key and not key.startswith("sc_") and "_rl_" not in key:
            label = "SoS+" if key.startswith("sosp") else "APR"
            lat_points[label].append((s["mean_sequential_tokens"], s["wall_s"] / max(1, s["problems"]), s["accuracy"]))

    extra = [(aid.replace("+", "_"), f"accuracy {aid} aid") for aid in plan.apr_aids]
    lines += ["## 5. Effect of RL (APR)", "",
              "| | accuracy plain | accuracy aided | " + "".join(f"{h} | " for _, h in extra)
              + "children (plain) | total tokens (plain) | sequential tokens (plain) |",
              "|---|---|---|" + "---|" * len(extra) + "---|---|---|"]
    for stage, label in (("sft", "before RL (SFT)"), ("rl", "after RL")):
        p, a = get(f"apr_{stage}_plain"), get(f"apr_{stage}_aided")
        cells = [_pct(s["accuracy"]) if s else "not run" for s in [p, a] + [get(f"apr_{stage}_{k}") for k, _ in extra]]
        lines.append(f"| {label} | " + " | ".join(cells) + " | "
                     + (f"{p['mean_children']:.2f} | {p['mean_total_tokens']:.0f} | {p['mean_sequential_tokens']:.0f} |"
                        if p else " | | |"))
    rl = (demo.done("rl_apr") or {}).get("summary")
    if rl:
        lines.append(f"\nGRPO: {rl['steps']} step(s) of {plan.rl_problems_per_step} problems x G={plan.rl_group_size} "
                     f"(aid: {plan.rl_aid or 'none'}, temperature {plan.rl_temperature or demo.preset.rl.temperature}"
                     + (", trained on the groups whose rewards differ only" if plan.rl_skip_uniform_groups else "")
                     + "), "
                     f"{walls.get('rl_apr', 0) / 60:.0f} min; last step reward "
                     f"{rl['last'].get('reward', 0):.3f}, KL {rl['last'].get('kl', 0):.4f}"
                     + (f", {rl['last']['kept_rollouts']} of {plan.rl_problems_per_step * plan.rl_group_size} rollouts "
                        "trained on" if plan.rl_skip_uniform_groups and "kept_rollouts" in rl["last"] else "") + ".")
    lines += [f"\nPaper: {_pct(PAPER['apr_sft_greedy'])} -> {_pct(PAPER['apr_rl_greedy'])}, children "
              f"{PAPER['children_sft_rl'][0]} -> {PAPER['children_sft_rl'][1]}.", ""]
    if (demo.rl_dir / "rl.png").exists():
        shutil.copyfile(demo.rl_dir / "rl.png", out / "rl.png")
        lines += ["![rl](rl.png)", ""]
    for m in ("sosp", "apr"):
        if (demo.sft_dir(m) / "loss.png").exists():
            shutil.copyfile(demo.sft_dir(m) / "loss.png", out / f"loss_{m}.png")
    comparisons = [("APR SFT vs SoS+ SFT, plain", "apr_sft_plain", "sosp_sft_plain"),
                   ("APR SFT vs SoS+ SFT, aided", "apr_sft_aided", "sosp_sft_aided"),
                   ("APR SFT+RL vs APR SFT, plain", "apr_rl_plain", "apr_sft_plain")]
    if plan.rl_aided_eval:
        comparisons.append(("APR SFT+RL vs APR SFT, aided", "apr_rl_aided", "apr_sft_aided"))
    for aid in plan.apr_aids:
        key = aid.replace("+", "_")
        comparisons.append((f"APR SFT+RL vs APR SFT, {aid} aid", f"apr_rl_{key}", f"apr_sft_{key}"))
    for ctx in list(plan.sweep_contexts) + [main_ctx]:
        at = None if ctx == main_ctx else ctx
        for method, label, budget in columns[1:]:
            if at is not None or budget is not None:
                comparisons.append((f"{label} vs SoS+, {ctx} tokens per thread, aided", sweep_name(method, at, budget),
                                    sweep_name("sosp", at)))
    lines += ["## 6. Which differences are more than noise (paired, same problems)", "",
              "Both evaluations on the same problems: each accuracy with its 95% Wilson interval, the problems "
              "only one of them solves, and the exact McNemar test on those (two-sided; `apr_jax.compare`, "
              "`apr-jax compare A.jsonl B.jsonl`). A p-value well above 0.05 means the two are not told apart "
              "by this many problems.", ""] + compare.TABLE_HEADER + paired_table(demo, comparisons) + [""]

    lines += ["## Stage wall times", "", "| stage | minutes |", "|---|---|"]
    lines += [f"| {k} | {v / 60:.1f} |" for k, v in walls.items()]
    lines.append(f"| total | {sum(walls.values()) / 60:.1f} |")

    plot_accuracy(out / "accuracy.png", {
        label: ((get(f"{k}_plain") or {}).get("accuracy"), (get(f"{k}_aided") or {}).get("accuracy"))
        for k, label in (("sosp_sft", "SoS+ SFT"), ("apr_sft", "APR SFT"), ("apr_rl", "APR SFT+RL"))},
        problems=(get("sosp_sft_plain") or {}).get("problems") or None)
    plot_context(out / "same_context.png", ctx_points)
    plot_scaling(out / "compute_scaling.png", sc, apr_points, preset=demo.preset.name)
    plot_latency(out / "latency.png", lat_points)
    results = {"preset": demo.preset.name, "plan": plan.name, "evaluations": summaries, "sc_curves": sc,
               "stage_wall_s": walls, "paper": PAPER}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
