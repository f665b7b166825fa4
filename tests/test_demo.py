"""The demo pipeline end to end on the tiny preset (every stage, the report, resume), and the report's maths."""

import dataclasses
import json

import pytest

from apr_jax import demo, presets, report

PLAN = demo.Plan("test", None, None, sft_steps=3, sft_batch=8, sft_seq_len=None, eval_problems=3, eval_context=128,
                 max_total_tokens=512, sweep_contexts=(64,),
                 sweep_problems=2, sc_samples=2, sc_problems=2, rl_steps=1, rl_problems_per_step=2, rl_group_size=2,
                 slots=8, apr_sft_steps=2, apr_from_sosp=True, apr_lr=(1e-4, 1e-3, 1e-5, 1), sub_call_budget=2,
                 apr_aids=("spawn",), rl_temperature=0.5, sweep_sub_call_budgets=(1,),
                 apr_mask_continuation_prompts=True)


def test_demo_runs_every_stage_writes_the_report_and_resumes(tmp_path):
    preset = presets.load("tiny")
    out = tmp_path / "demo"
    logs = []
    path = demo.Demo(preset, PLAN, out, workers=1, progress=False).run(log=logs.append)
    text = path.read_text()
    for heading in ("## 1. Accuracy (128 tokens per thread)", "## 2. Same context", "## 3. Compute scaling", "## 4. Sequential", "## 5. Effect of RL"):
        assert heading in text
    assert "not run" not in text
    masked = {m: json.loads((out / f"sft_{m}" / "config.json").read_text())["train"]["mask_continuation_prompts"]
              for m in ("sosp", "apr")}
    assert masked == {"sosp": False, "apr": True} and "(no loss on continuation prompts)" in text
    assert "## What the SFT models learned (teacher-forced)" in text
    probed = json.loads((out / "stages" / "probe_sft.json").read_text())["summary"]
    for method in ("sosp", "apr"):
        assert probed[method]["sequences"] == PLAN.eval_problems
        kinds = probed[method]["kinds"]
        assert kinds["other"]["tokens"] > 0 and 0.0 <= kinds["other"]["accuracy"] <= 1.0
    assert "| result | the result after `=` (arithmetic) |" in text
    assert "### Where APR's answers come from" in text
    solved = sum(json.loads(line)["correct"] for line in (out / "eval" / "sosp_sft_plain.jsonl").open())
    verdict = "met" if solved >= 0.3 * PLAN.eval_problems else "**not met**"
    assert f"Aim (SoS+ SFT solves at least 30% plain): {verdict}, {100 * solved / PLAN.eval_problems:.1f}% [" in text
    section = text.split("### Where APR's answers come from")[1].split("##")[0]
    row = next(line for line in section.splitlines() if line.startswith("| APR SFT, plain | "))
    cells = [c.strip() for c in row.split("|")[2:-1]]  # child path "k/n", four counts, where parents went wrong
    found, n = map(int, cells[0].split("/"))
    assert n == PLAN.eval_problems and sum(map(int, cells[1:4])) == found
    where = cells[5]  # "operation 1 3, no path 1": one count per parent that failed a verified child path
    departed = 0 if where == "-" else sum(int(part.rsplit(" ", 1)[1]) for part in where.split(", "))
    assert departed == int(cells[2]) + int(cells[3])
    section = text.split("## 6. Which differences are more than noise")[1].split("##")[0]
    rows = {line.split(" | ")[0][2:]: line for line in section.splitlines() if line.startswith("| APR")}
    assert set(rows) == {"APR SFT vs SoS+ SFT, plain", "APR SFT vs SoS+ SFT, aided", "APR SFT+RL vs APR SFT, plain",
                         "APR SFT+RL vs APR SFT, aided", "APR SFT+RL vs APR SFT, spawn aid",
                         "APR (Sub Call Budget 2) vs SoS+, 64 tokens per thread, aided",
                         "APR (Sub Call Budget 1) vs SoS+, 64 tokens per thread, aided",
                         "APR (Sub Call Budget 1) vs SoS+, 128 tokens per thread, aided"}
    cells = [c.strip() for c in rows["APR SFT vs SoS+ SFT, plain"].split("|")[2:-1]]
    solved = {m: sum(json.loads(line)["correct"] for line in (out / "eval" / f"{m}_sft_plain.jsonl").open())
              for m in ("apr", "sosp")}
    assert int(cells[0]) == PLAN.eval_problems
    assert int(cells[3]) - int(cells[4]) == solved["apr"] - solved["sosp"]  # A only - B only = A - B
    results = json.loads((out / "results.json").read_text())
    assert set(results["evaluations"]) == {
        "sosp_sft_plain", "apr_sft_plain", "sosp_sft_aided", "apr_sft_aided", "sosp_sft_aided_ctx64",
        "apr_sft_aided_ctx64", "sc_sft_aided", "apr_rl_plain", "apr_rl_aided", "apr_sft_spawn", "apr_rl_spawn",
        "apr_sft_aided_b1_ctx64", "apr_sft_aided_b1"}
    assert results["evaluations"]["apr_sft_aided_b1_ctx64"]["context"] == 64
    first_b1 = json.loads((out / "eval" / "apr_sft_aided_b1.jsonl").read_text().splitlines()[0])
    assert first_b1["threads"][0]["prompt"].startswith("Sub Call Budget: 1 ")
    assert "| context | SoS+ | APR (Sub Call Budget 2) | APR (Sub Call Budget 1) |" in text
    assert results["evaluations"]["apr_sft_spawn"]["aid"] == "spawn"
    # the APR model starts from the SoS+ one and trains on the child-count-prefixed copy of the data
    apr_run = json.loads((out / "sft_apr" / "config.json").read_text())
    assert "sft_sosp" in json.dumps(apr_run) and "data_cond" in json.dumps(apr_run)
    first = json.loads((out / "eval" / "apr_sft_plain.jsonl").read_text().splitlines()[0])
    assert first["threads"][0]["prompt"].startswith("Sub Call Budget: 2 ")
    assert results["evaluations"]["sosp_sft_aided_ctx64"]["context"] == 64
    assert results["evaluations"]["apr_sft_aided"]["aid"] == "arithmetic"
    assert results["evaluations"]["apr_sft_plain"]["forced_tokens"] == 0
    assert [r["n"] for r in results["sc_curves"]] == [1, 2]
    for png in ("accuracy.png", "same_context.png", "compute_scaling.png", "latency.png", "rl.png"):
        assert (out / png).stat().st_size > 1000
    assert len(list((out / "stages").glob("*.json"))) == len(demo.Demo(preset, PLAN, out).stages())

    again = []
    demo.Demo(preset, PLAN, out, workers=1, progress=False).run(log=again.append)
    assert sum("done, skipped" in line for line in again) == len(again) - 1  # every stage; then the final line

    (out / "stages" / "report.json").unlink()  # a stage without its marker runs again, alone
    third = []
    demo.Demo(preset, PLAN, out, workers=1, progress=False).run(log=third.append)
    assert [line for line in third if "skipped" not in line][0].startswith(f"[{len(again) - 1}/")

    (out / "stages" / "probe_sft.json").unlink()  # an earlier stage that runs again rewrites the report too
    fourth = []
    demo.Demo(preset, PLAN, out, workers=1, progress=False).run(log=fourth.append)
    ran = [line.split("]")[1].split()[0] for line in fourth if line.startswith("[") and "skipped" not in line]
    assert ran == ["probe_sft", "report"]

    with pytest.raises(ValueError, match="another preset or plan"):
        demo.Demo(preset, dataclasses.replace(PLAN, sft_steps=4), out).run(log=lambda _: None)


def _sc_result(samples):
    threads = [{"path": f"s{i}", "prompt_tokens": 10, "new_prompt_tokens": 10, "tokens": 90} for i in range(len(samples))]
    return {"samples": [{"answer": a, "correct": c} for a, c in samples], "threads": threads}


def test_sc_curves_pass_and_majority_vote_over_the_first_n_samples():
    good = "Moving to Node #0\nCurrent State: 5:[2, 3], Operations: ['2+3=5']\n5,5 equal: Goal Reached\n"
    bad = "Moving to Node #0\nCurrent State: 5:[2, 3], Operations: ['3-2=1']\n1,5 unequal: No Solution\n"
    results = [_sc_result([(bad, False), (good, True), (good, True)]),  # cons@1 wrong, cons@3 right
               _sc_result([(None, False), (None, False), (bad, False)]),
               _sc_result([(good, True), (bad, False), (bad, False)])]  # a 1-1 tie goes to the earliest
    rows = report.sc_curves(results)
    assert [r["pass_at_n"] for r in rows] == pytest.approx([1 / 3, 2 / 3, 2 / 3])
    assert [r["cons_at_n"] for r in rows] == pytest.approx([1 / 3, 1 / 3, 1 / 3])
    assert [r["mean_total_tokens"] for r in rows] == pytest.approx([100, 200, 300])


def test_demo_command_overrides_plan_fields_and_names_a_bad_one(tmp_path, monkeypatch):
    from apr_jax import cli

    seen = {}

    class FakeDemo:
        def __init__(self, preset, plan, out, **_):
            seen.update(preset=preset, plan=plan)

        def run(self):
            return tmp_path / "report.md"

    monkeypatch.setattr(demo, "Demo", FakeDemo)
    assert cli.main(["demo", "--quick", "--out", str(tmp_path), "--set", "plan.apr_sft_steps=7",
                     "--set", "plan.rl_aided_eval=false", "--set", "plan.sweep_contexts=128,192",
                     "--set", "train.eval_every=5"]) == 0
    plan = seen["plan"]
    assert (plan.apr_sft_steps, plan.rl_aided_eval, plan.sweep_contexts) == (7, False, (128, 192))
    assert plan.sft_steps == demo.QUICK.sft_steps and seen["preset"].train.eval_every == 5
    with pytest.raises(SystemExit, match="no field 'apr_steps'"):
        cli.main(["demo", "--quick", "--out", str(tmp_path), "--set", "plan.apr_steps=7"])


def test_aim_line_states_whether_sosp_reached_30_percent():
    from apr_jax.report import aim_line
    assert aim_line({"problems": 200, "accuracy": 0.30}).startswith(
        "Aim (SoS+ SFT solves at least 30% plain): met, 30.0% [")
    assert "**not met**, 29.5% [" in aim_line({"problems": 200, "accuracy": 0.295})
    assert aim_line(None).endswith("not evaluated.")
