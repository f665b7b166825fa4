"""``apr-jax demo``: the whole pipeline on one preset, from a seed to a report.

data -> SFT SoS+ and APR -> probe what each learned (teacher-forced) -> evaluate both (plain, and with the
labelled arithmetic aid) -> same-context sweep, self-consistency -> GRPO the APR model (short) -> evaluate
again -> ``report.md`` + PNG plots.

Every stage writes its outputs under one folder and a marker ``stages/<name>.json`` (its wall time and
summary) when it completes; a rerun skips completed stages and resumes an interrupted one (SFT and GRPO
from their last checkpoint, evaluations from their ``.partial`` results), so a killed demo loses at most
the work since the last checkpoint. What each stage does, and how many problems/steps, is a :class:`Plan`:
``FULL`` (the README's figures) or ``QUICK`` (same stages, small numbers, minutes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable

from apr_jax import presets


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes of one demo run (all evaluations use the preset's validation problems, greedy unless noted).

    Attributes:
      num_train, num_val: problems generated (None: the preset's).
      sft_steps, sft_batch: SFT steps and sequences per step, for each of the two models.
      sft_seq_len: SFT sequence length (None: the preset's; longer demonstrations are cut).
      eval_problems: problems of the main evaluations (SoS+ and APR, plain and aided, before/after RL).
      eval_context: tokens per thread in the main evaluations, the self-consistency run and GRPO rollouts
        (None: the model's context).
      max_total_tokens: tokens per problem over all its threads, in every evaluation and rollout (a weak
        model's APR tree can otherwise spend 16 children x the context).
      sweep_contexts: smaller thread contexts of the same-context sweep (``eval_context`` is its last point).
      sweep_problems: problems per sweep point.
      sc_samples: samples of the self-consistency evaluation (temperature 1.0; pass@n and cons@n, n <= this).
      sc_problems: problems of the self-consistency evaluation.
      rl_steps, rl_problems_per_step, rl_group_size: the GRPO run.
      slots: threads the engine decodes at once.
      aid: decoding aid of the aided evaluations (applied to every method alike).
      apr_sft_steps, apr_sft_batch: the APR model's SFT steps and batch (None: ``sft_steps``/``sft_batch``).
      apr_from_sosp: start the APR model from the SoS+ model's parameters (fresh optimizer, schedule
        ``apr_lr``) instead of a random initialisation: on 3 numbers only a warm-started APR model spawns.
      sft_lr, apr_lr: (init, peak, end, warmup steps) of each SFT schedule (None: the preset's).
      apr_mask_continuation_prompts: train the APR model without loss on its continuation calls' prompts
        (:attr:`apr_jax.train.config.SFTConfig.mask_continuation_prompts`; False = the paper's recipe).
      sub_call_budget: train the APR model on data with the paper's child-count prefixes (a second data
        folder, ``data_cond``) and evaluate and roll it out with ``Sub Call Budget: n``; None: no prefix.
      apr_aids: further aids applied to the APR evaluations only, each one more row (e.g. ``"spawn"``).
      sweep_sub_call_budgets: further APR child budgets (``Sub Call Budget: n``, with ``sub_call_budget``)
        evaluated at every sweep context and at the evaluation context, on ``sweep_problems`` problems with
        ``aid``: the paper's Fig. 4b plots APR at several child counts.
      rl_aid, rl_temperature: the GRPO rollouts' aid and temperature (None: ``"none"`` and the preset's).
      rl_skip_uniform_groups: GRPO trains only on groups whose rewards differ
        (:attr:`apr_jax.rl.config.GRPOConfig.skip_uniform_groups`; the paper's objective keeps every group).
      rl_aided_eval: evaluate the GRPO model with ``aid`` too (its plain and ``apr_aids`` rows always run).
      estimates_s: rough seconds per stage kind on a 2-core CPU (only for the time-left estimate).
    """

    name: str
    num_train: int | None
    num_val: int | None
    sft_steps: int
    sft_batch: int
    sft_seq_len: int | None
    eval_problems: int
    eval_context: int | None
    max_total_tokens: int | None
    sweep_contexts: tuple[int, ...]
    sweep_problems: int
    sc_samples: int
    sc_problems: int
    rl_steps: int
    rl_problems_per_step: int
    rl_group_size: int
    slots: int = 32
    aid: str = "arithmetic"
    apr_sft_steps: int | None = None
    apr_sft_batch: int | None = None
    apr_from_sosp: bool = False
    sft_lr: tuple[float, float, float, int] | None = None
    apr_lr: tuple[float, float, float, int] | None = None
    apr_mask_continuation_prompts: bool = False
    sub_call_budget: int | None = None
    apr_aids: tuple[str, ...] = ()
    sweep_sub_call_budgets: tuple[int, ...] = ()
    rl_aid: str | None = None
    rl_temperature: float | None = None
    rl_skip_uniform_groups: bool = False
    rl_aided_eval: bool = True
    estimates_s: tuple[tuple[str, float], ...] = ()

    def sft_size(self, method: str) -> tuple[int, int]:
        """(steps, sequences per step) of one method's SFT run."""
        if method == "apr":
            return self.apr_sft_steps or self.sft_steps, self.apr_sft_batch or self.sft_batch
        return self.sft_steps, self.sft_batch


# Sized on a 2-core CPU for the 3-number task (``--preset mini3``, docs/experiments.md): one SoS+ run of 3,400
# steps of 8 (8.5M tokens; 2,600 steps, 6.5M tokens, left it at 28.3-30.5%, at or below the mini aim of 30%;
# 3,400 reach 38.0% of 200 validation problems), the
# APR model warm-started from it on child-count-prefixed data (900 steps of 24: 30-40 minutes; 600 steps left a
# model that spawns in 40 of 200 problems and solves 0.5%), evaluations on 200 problems at 1,024 tokens per
# thread (100 for the sweep and self-consistency; the sweep's 320 and 384 are where a SoS+ trace stops fitting,
# and APR runs there with 2 children as well as 4), and GRPO at temperature 0.5 (at 1.0 the SFT model solves
# nothing to learn from) that trains on the groups whose rewards differ only, 15 steps of 16 problems (3 steps
# changed nothing measurable; 15 raised the 2,600-step plan's APR model 32.8% -> 34.6% on all 500 validation
# problems with either of two seeds, 30 steps to 35.6-39.0% over three seeds, docs/rl.md; from the 3,400-step
# plan's model 15 steps changed nothing, 33.0% -> 32.5% of 200);
# after it, the plain and spawn-aid rows. The APR SFT leaves the continuation calls' prompts out of the loss
# (the paper's recipe keeps them), which removes the self-written join marker; on one host 30.5% and 31.0% plain
# over two data orders against 21.5% and 31.0% (docs/experiments.md). End to end: 57.5 minutes of stages on a
# 2-core AVX-512 host (54 minutes from a fresh clone with 2,600 SoS+ steps); on a slower 2-core host about 109
# (about 145 on its slowest day).
FULL = Plan("full", None, None, sft_steps=3400, sft_batch=8, sft_seq_len=None, eval_problems=200, eval_context=1024,
            max_total_tokens=8192, sweep_contexts=(256, 320, 384, 512), sweep_problems=100, sc_samples=8,
            sc_problems=100, sweep_sub_call_budgets=(2,),
            rl_steps=15, rl_problems_per_step=16, rl_group_size=5, slots=32,
            apr_sft_steps=900, apr_sft_batch=24, apr_from_sosp=True, apr_lr=(3e-5, 3e-4, 1e-5, 25),
            apr_mask_continuation_prompts=True,
            sub_call_budget=4, apr_aids=("spawn",), rl_temperature=0.5, rl_skip_uniform_groups=True,
            rl_aided_eval=False,
            estimates_s=(("data", 40), ("sft", 4450), ("sft_apr", 2000), ("probe", 30), ("eval", 120), ("sweep", 60),
                         ("sc", 180), ("rl", 900), ("report", 10)))
QUICK = Plan("quick", 2_000, 100, sft_steps=24, sft_batch=4, sft_seq_len=1024, eval_problems=8, eval_context=512,
             max_total_tokens=2048, sweep_contexts=(256,), sweep_problems=8, sc_samples=2, sc_problems=4, rl_steps=1,
             rl_problems_per_step=2, rl_group_size=2, slots=16,
             apr_from_sosp=True, apr_lr=(3e-5, 3e-4, 1e-5, 5), apr_mask_continuation_prompts=True,
             sub_call_budget=4, apr_aids=("spawn",),
             rl_temperature=0.5,
             estimates_s=(("data", 10), ("sft", 100), ("probe", 15), ("eval", 20), ("sweep", 15), ("sc", 20),
                          ("rl", 60), ("report", 5)))
PLANS = {"full": FULL, "quick": QUICK}


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str  # marker file name and progress label
    kind: str  # key of Plan.estimates_s
    run: Callable[[], dict]  # does the work (resuming what it can); returns a JSON-able summary


def sweep_name(method: str, context: int | None, budget: int | None = None) -> str:
    """Result name of a same-context point of the SFT model of ``method`` with the plan's aid (``context``
    None: the evaluation context); ``budget``: an APR run asked for that many children (``Sub Call Budget``)
    instead of the plan's."""
    return (f"{method}_sft_aided" + ("" if budget is None else f"_b{budget}")
            + ("" if context is None else f"_ctx{context}"))


class Demo:
    """The stages of one demo run (see module docstring)."""

    def __init__(self, preset: presets.Preset, plan: Plan, out: str | Path, *, workers: int = 0,
                 progress: bool = True):
        self.preset, self.plan, self.out = preset, plan, Path(out)
        self.workers, self.progress = workers or os.cpu_count() or 1, progress
        data = preset.data
        if plan.num_train is not None:
            data = dataclasses.replace(data, num_train=plan.num_train, num_val=plan.num_val,
                                       chunk_size=min(data.chunk_size, plan.num_train))
        self.data_cfg = data
        self.marker_dir = self.out / "stages"

    # ------------------------------------------------------------------------------------ paths

    @property
    def data_dir(self) -> Path:
        return self.out / "data"

    def sft_dir(self, method: str) -> Path:
        return self.out / f"sft_{method}"

    def method_data_dir(self, method: str) -> Path:
        """The data an SFT run of ``method`` trains on (APR: the child-count-prefixed copy when the plan asks)."""
        return self.out / "data_cond" if method == "apr" and self.plan.sub_call_budget is not None else self.data_dir

    @property
    def rl_dir(self) -> Path:
        return self.out / "rl_apr"

    def eval_file(self, name: str) -> Path:
        return self.out / "eval" / f"{name}.jsonl"

    # ------------------------------------------------------------------------------------ stages

    def _data(self) -> dict:
        from apr_jax.data import datasets

        manifest = datasets.generate(self.data_cfg, self.data_dir, workers=self.workers, progress=self.progress)
        if self.plan.sub_call_budget is not None:  # same problems and demonstrations, prefixed token arrays
            datasets.generate(dataclasses.replace(self.data_cfg, condition_prefix=True), self.method_data_dir("apr"),
                              workers=self.workers, progress=self.progress)
        return {"stats": manifest["stats"], "vocab_size": manifest["vocab_size"]}

    def _sft(self, method: str) -> dict:
        from apr_jax.train import sft
        from apr_jax.train.checkpoint import RunCheckpointer

        run_dir, plan = self.sft_dir(method), self.plan
        ckpts = run_dir / "checkpoints"
        resume = ckpts.is_dir() and RunCheckpointer(ckpts, read_only=True).latest_step() is not None
        steps, batch = plan.sft_size(method)
        seq_len = {} if plan.sft_seq_len is None else {"seq_len": plan.sft_seq_len}
        lr = plan.apr_lr if method == "apr" and plan.apr_from_sosp else plan.sft_lr
        if lr is None:
            lr = {"warmup_steps": min(self.preset.train.warmup_steps, max(1, steps // 4))}
        else:
            lr = dict(zip(("init_lr", "peak_lr", "end_lr", "warmup_steps"), lr))
        masked = method == "apr" and plan.apr_mask_continuation_prompts
        cfg = dataclasses.replace(self.preset.train, steps=steps, epochs=None, batch_size=batch, **lr, **seq_len,
                                  mask_continuation_prompts=masked or self.preset.train.mask_continuation_prompts,
                                  eval_every=max(1, steps // 5), ckpt_every=max(1, steps // 10), eval_batches=4)
        init = self.sft_dir("sosp") if method == "apr" and plan.apr_from_sosp else None
        summary = sft.train(self.preset.model, cfg, self.method_data_dir(method), method, run_dir, resume=resume,
                            preset=self.preset.name, init_from=init)
        if summary["interrupted"]:
            raise KeyboardInterrupt(f"SFT {method} interrupted at step {summary['final_step']} (checkpoint saved)")
        return {k: summary[k] for k in ("steps", "final_step", "train_loss", "val_loss", "tokens_seen", "wall_s")}

    def _probe(self) -> dict:
        """Teacher-forced accuracy of both SFT models by kind of trace token (:mod:`apr_jax.train.probe`).

        On the first ``eval_problems`` validation sequences of each method: what a model has learned on the
        way (format, copying, arithmetic, retrieval) while its greedy accuracy may still be 0.
        """
        from apr_jax.inference.evaluate import load_run_model
        from apr_jax.train.probe import probe_checkpoint, validation_sequences

        out = {}
        for method in ("sosp", "apr"):
            cfg, params, tok = load_run_model(self.sft_dir(method))
            seqs = validation_sequences(self.method_data_dir(method), method, self.plan.eval_problems)
            out[method] = {"sequences": len(seqs), "kinds": probe_checkpoint(cfg, params, tok, seqs)}
        return out

    def _rl(self) -> dict:
        from apr_jax.rl import grpo
        from apr_jax.rl.config import METHOD_KL_BETA
        from apr_jax.train.checkpoint import RunCheckpointer

        plan = self.plan
        temperature = {} if plan.rl_temperature is None else {"temperature": plan.rl_temperature}
        cfg = dataclasses.replace(self.preset.rl, kl_beta=METHOD_KL_BETA["apr"], steps=plan.rl_steps,
                                  problems_per_step=plan.rl_problems_per_step, group_size=plan.rl_group_size,
                                  skip_uniform_groups=plan.rl_skip_uniform_groups, **temperature)
        loop = grpo.LoopConfig(slots=plan.slots, micro_batch=8, context=plan.eval_context,
                               max_total_tokens=plan.max_total_tokens, eval_every=0, ckpt_every=1,
                               aid=plan.rl_aid or "none", sub_call_budget=plan.sub_call_budget)
        ckpts = self.rl_dir / "checkpoints"
        resume = ckpts.is_dir() and RunCheckpointer(ckpts, read_only=True).latest_step() is not None
        summary = grpo.train(self.sft_dir("apr"), self.rl_dir, cfg, loop, resume=resume, progress=self.progress)
        if summary["last"].get("step") != plan.rl_steps:
            raise KeyboardInterrupt(f"GRPO interrupted at step {summary['last'].get('step')} (checkpoint saved)")
        return {"steps": plan.rl_steps, "last": summary["last"]}

    def _eval(self, name: str, run_dir: Path, mode: str, *, n: int, aid: str = "none", context: int | None = None,
              samples: int = 1, temperature: float = 0.0, sub_call_budget: int | None = None) -> dict:
        from apr_jax.inference import evaluate as ev
        from apr_jax.inference.runtime import Budgets, RunConfig
        from apr_jax.inference.sampling import Sampling

        model_cfg, params, tok = ev.load_run_model(run_dir)
        problems = ev.load_problems(run_dir, None, n)
        budget = self.plan.max_total_tokens
        if budget is not None and mode == "sc":
            budget *= samples  # the budget is per problem; self-consistency's samples share it
        run = RunConfig(mode=mode, samples=samples, seed=0, budgets=Budgets(max_total_tokens=budget),
                        sub_call_budget=(self.plan.sub_call_budget if sub_call_budget is None else sub_call_budget)
                        if mode == "apr" else None)
        _, summary = ev.evaluate(model_cfg, params, tok, problems, run, slots=self.plan.slots, context=context,
                                 sampling=Sampling(temperature=temperature), out=self.eval_file(name),
                                 progress=self.progress, aid=aid)
        return summary

    def _report(self) -> dict:
        from apr_jax import report

        path = report.write_report(self)
        return {"report": str(path)}

    def _apr_eval_stage(self, stage: str, run_dir: Path, aid: str) -> Stage:
        """An APR-only evaluation with one of ``plan.apr_aids`` (result ``apr_{stage}_{aid}``)."""
        name = f"apr_{stage}_{aid.replace('+', '_')}"
        return Stage(f"eval_{name}", "eval", lambda: self._eval(name, run_dir, "apr", n=self.plan.eval_problems,
                                                                aid=aid, context=self.plan.eval_context))

    def stages(self) -> list[Stage]:
        plan, aid = self.plan, self.plan.aid
        sosp, apr = self.sft_dir("sosp"), self.sft_dir("apr")
        out = [Stage("data", "data", self._data),
               Stage("sft_sosp", "sft", lambda: self._sft("sosp")),
               Stage("sft_apr", "sft_apr", lambda: self._sft("apr")),
               Stage("probe_sft", "probe", self._probe)]
        for label, aid_name in (("plain", "none"), ("aided", aid)):
            for method, run_dir in (("sosp", sosp), ("apr", apr)):
                name = f"{method}_sft_{label}"
                out.append(Stage(f"eval_{name}", "eval", lambda name=name, run_dir=run_dir, method=method,
                                 aid_name=aid_name: self._eval(name, run_dir, method, n=plan.eval_problems,
                                                               aid=aid_name, context=plan.eval_context)))
        for aid_name in plan.apr_aids:
            out.append(self._apr_eval_stage("sft", apr, aid_name))
        for ctx in plan.sweep_contexts:
            for method, run_dir in (("sosp", sosp), ("apr", apr)):
                name = sweep_name(method, ctx)
                out.append(Stage(f"eval_{name}", "sweep", lambda name=name, run_dir=run_dir, method=method, ctx=ctx:
                                 self._eval(name, run_dir, method, n=plan.sweep_problems, aid=aid, context=ctx)))
        for budget in plan.sweep_sub_call_budgets if plan.sub_call_budget is not None else ():
            for ctx in list(plan.sweep_contexts) + [None]:
                name = sweep_name("apr", ctx, budget)
                out.append(Stage(f"eval_{name}", "sweep", lambda name=name, ctx=ctx, budget=budget: self._eval(
                    name, apr, "apr", n=plan.sweep_problems, aid=aid, context=ctx or plan.eval_context,
                    sub_call_budget=budget)))
        out.append(Stage("eval_sc_sft_aided", "sc", lambda: self._eval(
            "sc_sft_aided", sosp, "sc", n=plan.sc_problems, aid=aid, samples=plan.sc_samples, temperature=1.0,
            context=plan.eval_context)))
        out.append(Stage("rl_apr", "rl", self._rl))
        for label, aid_name in (("plain", "none"), ("aided", aid))[:2 if plan.rl_aided_eval else 1]:
            name = f"apr_rl_{label}"
            out.append(Stage(f"eval_{name}", "eval", lambda name=name, aid_name=aid_name: self._eval(
                name, self.rl_dir, "apr", n=plan.eval_problems, aid=aid_name, context=plan.eval_context)))
        for aid_name in plan.apr_aids:
            out.append(self._apr_eval_stage("rl", self.rl_dir, aid_name))
        out.append(Stage("report", "report", self._report))
        return out

    # ------------------------------------------------------------------------------------ driver

    def marker(self, name: str) -> Path:
        return self.marker_dir / f"{name}.json"

    def done(self, name: str) -> dict | None:
        path = self.marker(name)
        return json.loads(path.read_text()) if path.exists() else None

    def run(self, log: Callable[[str], None] = print) -> Path:
        """Run every stage not yet done; returns the report's path."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.marker_dir.mkdir(exist_ok=True)
        plan_file = self.out / "plan.json"
        plan = {k: v for k, v in dataclasses.asdict(self.plan).items() if k != "estimates_s"}  # not outputs
        record = {"preset": self.preset.name, "plan": plan, "data": dataclasses.asdict(self.data_cfg)}
        if plan_file.exists() and json.loads(plan_file.read_text()) != json.loads(json.dumps(record)):
            raise ValueError(f"{self.out} holds a demo run with another preset or plan ({plan_file}); "
                             "use another --out or delete the folder")
        plan_file.write_text(json.dumps(record, indent=1) + "\n")
        estimates = dict(self.plan.estimates_s)
        if "sft" in estimates:
            estimates.setdefault("sft_apr", estimates["sft"])
        stages = self.stages()
        t0, spent_est, spent, ran = time.perf_counter(), 0.0, 0.0, False
        for i, stage in enumerate(stages, 1):
            # the report is rewritten whenever a stage before it ran (e.g. one added to an older run folder)
            if self.done(stage.name) is not None and not (ran and stage.kind == "report"):
                log(f"[{i}/{len(stages)}] {stage.name}: done, skipped")
                continue
            left = sum(estimates.get(s.kind, 0) for s in stages[i - 1:] if self.done(s.name) is None)
            scale = spent / spent_est if spent_est else 1.0
            log(f"[{i}/{len(stages)}] {stage.name} (about {left * scale / 60:.0f} min left for the demo)")
            t = time.perf_counter()
            summary = stage.run()
            ran = True
            wall = time.perf_counter() - t
            if wall > 0.1 * estimates.get(stage.kind, 0):  # a stage resumed from finished work says nothing
                spent, spent_est = spent + wall, spent_est + estimates.get(stage.kind, wall)
            self.marker(stage.name).write_text(json.dumps({"wall_s": round(wall, 1), "summary": summary},
                                                          indent=1, default=str) + "\n")
        log(f"demo finished ({time.perf_counter() - t0:.0f} s this run); report: {self.out.resolve() / 'report.md'}")
        return self.out / "report.md"
