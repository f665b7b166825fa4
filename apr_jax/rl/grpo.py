"""GRPO through whole thread trees: rollouts on the slot engine, the paper's update, checkpoints, metrics.

One RL step (the paper's GRPO recipe):

1. **Rollouts.** ``problems_per_step`` problems (a fixed seeded order over the training problems), each
   rolled out ``group_size`` times at ``temperature`` by the engine and the APR (or SoS+) runtime. Rollout
   ``g`` of problem ``p`` is problem id ``"p#g"``, and every thread's PRNG key derives from (seed + step,
   that id, the thread path): a step's rollouts are a pure function of the parameters and the step.
2. **Rewards and advantages.** 1 when the final answer verifies (optional shaping, off by default:
   :func:`apr_jax.rl.objective.reward`); advantages are normalised within each group and shared by every
   sequence of the rollout's tree (each parent call and each child is one sequence).
3. **Updates.** Old log-probabilities are those the engine recorded while sampling (equal to a fresh
   forward pass within 1e-4: ``tests/test_engine.py``), reference log-probabilities come from the frozen SFT
   parameters once per step, then ``inner_updates`` AdamW updates each accumulate the gradient of the
   paper's aggregated loss over all micro-batches of the step (micro-batch losses carry their rollouts'
   full sequence counts, so they add up to the whole-step loss).

The loop checkpoints params + optimizer state every ``ckpt_every`` steps (orbax; ``resume`` continues
exactly: the problem order and every rollout are functions of the seed and the step), validates greedily on
held-out problems every ``eval_every`` steps, and logs to ``metrics.jsonl`` and TensorBoard.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from apr_jax.countdown import traces
from apr_jax.countdown.problems import rng_for
from apr_jax.inference.aid import make_aid
from apr_jax.inference.engine import Engine
from apr_jax.inference.evaluate import evaluate as greedy_evaluate
from apr_jax.inference.runtime import Budgets, Codec, RunConfig, Runtime
from apr_jax.inference.sampling import Sampling
from apr_jax.model import forward, llama
from apr_jax.model.config import LlamaConfig
from apr_jax.rl.config import GRPOConfig
from apr_jax.rl.objective import (PARENT_CHOICES, choice_credit, group_advantages, grpo_loss, informative_rollouts,
                                  parent_choice, reward, token_logprobs)
from apr_jax.rl.sequences import Sequence as TrainSequence, bucket_width, pad_batch, rollout_sequences
from apr_jax.train import sharding as sh

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Settings of the RL loop that are not hyper-parameters of the method.

    Attributes:
      slots: threads the engine decodes at once during rollouts and validation.
      micro_batch: sequences per update micro-batch (a multiple of the mesh's data axis).
      context: tokens per thread (default: the model's context).
      max_total_tokens: optional per-problem token budget of a rollout.
      eval_every: greedy validation every this many steps (0: never; also before the first step).
      eval_problems: held-out problems per validation.
      ckpt_every: checkpoint every this many steps (and at the end).
      keep_checkpoints: checkpoints kept on disk.
      aid: decoding aid of rollouts and validation (``"none"`` or ``"arithmetic"``, see
        :mod:`apr_jax.inference.aid`); forced tokens carry no loss.
      sub_call_budget: conditioning prefix ``Sub Call Budget: n`` on every APR rollout and validation
        prompt (for a model trained with ``data.condition_prefix``); None: no prefix.
      token_budget: conditioning prefix ``Token Budget: b`` on every SoS+ prompt; None: no prefix.
      save_rollouts: write every step's rollouts to ``RUN/rollouts/step_NNNNN.jsonl`` (:func:`rollout_log`:
        each thread's prompt, output and stop, the rollout's reward, advantage and parent choice; token ids
        and log-probs left out), for auditing what an update was trained on.
    """

    slots: int = 16
    micro_batch: int = 8
    context: int | None = None
    max_total_tokens: int | None = None
    eval_every: int = 10
    eval_problems: int = 200
    ckpt_every: int = 5
    keep_checkpoints: int = 3
    aid: str = "none"
    sub_call_budget: int | None = None
    token_budget: int | None = None
    save_rollouts: bool = False

    def run_config(self, method: str, seed: int = 0) -> RunConfig:
        """The runtime settings of this loop's rollouts (``seed``) and validation (seed 0)."""
        return RunConfig(mode=method, seed=seed, sub_call_budget=self.sub_call_budget,
                         token_budget=self.token_budget, budgets=Budgets(max_total_tokens=self.max_total_tokens))


def make_optimizer(cfg: GRPOConfig) -> optax.GradientTransformation:
    """AdamW at a constant learning rate with global-norm clipping. No weight decay (the paper names none
    for RL), so an update is a pure function of the objective: equal rewards leave only the KL term."""
    adamw = optax.adamw(cfg.learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
    return adamw if cfg.grad_clip <= 0 else optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)


@functools.lru_cache(maxsize=4)
def _order(seed: int, epoch: int, n: int) -> tuple[int, ...]:
    order = list(range(n))
    rng_for(seed, "rl-order", epoch).shuffle(order)
    return tuple(order)


def step_problems(problems: Sequence[dict], cfg: GRPOConfig, step: int) -> list[dict]:
    """The problems of RL step ``step``: consecutive slices of one seeded permutation (reshuffled per pass)."""
    n, per = len(problems), cfg.problems_per_step
    if n == 0:
        raise ValueError("no training problems for RL")
    return [problems[_order(cfg.seed, i // n, n)[i % n]] for i in range(step * per, (step + 1) * per)]


def expand_groups(problems: Sequence[dict], group_size: int) -> list[dict]:
    """Each problem ``group_size`` times with ids ``"<id>#<g>"`` (rollouts of a problem are contiguous)."""
    return [{"id": f"{p.get('id', i)}#{g}", "nums": p["nums"], "target": p["target"]}
            for i, p in enumerate(problems) for g in range(group_size)]


# ------------------------------------------------------------------------------------- jitted pieces
def _logprobs(model_cfg: LlamaConfig, params, inputs_BT, targets_BT, temperature: float = 1.0):
    positions_BT = jnp.broadcast_to(jnp.arange(inputs_BT.shape[1], dtype=jnp.int32), inputs_BT.shape)
    logits_BTV, _ = forward(model_cfg, params, inputs_BT, positions_BT)
    if temperature != 1.0:
        logits_BTV = logits_BTV.astype(jnp.float32) / temperature
    return token_logprobs(logits_BTV, targets_BT)


def _loss(params, batch, ref_logp_BT, divisor, *, model_cfg: LlamaConfig, cfg: GRPOConfig):
    logp_BT = _logprobs(model_cfg, params, batch["inputs_BT"], batch["targets_BT"], cfg.logprob_temperature)
    return grpo_loss(logp_BT, batch["old_logp_BT"], ref_logp_BT, batch["adv_B"], batch["mask_BT"],
                     batch["rollout_B"], divisor, cfg.clip_epsilon, cfg.kl_beta,
                     rollout_size_B=batch["rollout_size_B"], aggregation=cfg.aggregation)


@functools.lru_cache(maxsize=4)
def compile_fns(model_cfg: LlamaConfig, cfg: GRPOConfig, mesh: jax.sharding.Mesh):
    """``(ref_logprobs, loss_and_grads, apply_updates, add_grads, optimizer, param_shardings,
    opt_shardings)``: the step's functions, jitted once per model/config/mesh with explicit shardings."""
    optimizer = make_optimizer(cfg)
    abstract = jax.eval_shape(functools.partial(llama.init, model_cfg), jax.random.PRNGKey(0))
    p_shard = sh.tree_shardings(abstract, mesh)
    o_shard = sh.tree_shardings(jax.eval_shape(optimizer.init, abstract), mesh)
    rows, scalar = sh.batch_sharding(mesh), sh.replicated(mesh)
    batch_shard = {k: rows for k in ("inputs_BT", "targets_BT", "mask_BT", "old_logp_BT", "adv_B", "rollout_B",
                                     "rollout_size_B")}
    ref = jax.jit(functools.partial(_logprobs, model_cfg, temperature=cfg.logprob_temperature),
                  in_shardings=(p_shard, rows, rows), out_shardings=rows)
    grads = jax.jit(jax.value_and_grad(functools.partial(_loss, model_cfg=model_cfg, cfg=cfg), has_aux=True),
                    in_shardings=(p_shard, batch_shard, rows, scalar),
                    out_shardings=((scalar, scalar), p_shard))

    def apply(params, opt_state, grads):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, optax.tree.norm(grads)

    apply = jax.jit(apply, in_shardings=(p_shard, o_shard, p_shard), out_shardings=(p_shard, o_shard, scalar))
    add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))
    return ref, grads, apply, add, optimizer, p_shard, o_shard


def micro_batches(seqs: list[TrainSequence], rows: int, context: int, pad_id: int) -> list[dict]:
    """Sequences sorted by length into padded micro-batches of ``rows`` (widths bucketed to powers of two)."""
    order = sorted(seqs, key=lambda s: len(s.tokens))
    out = []
    for start in range(0, len(order), rows):
        chunk = order[start:start + rows]
        width = bucket_width(max(len(s.tokens) for s in chunk) - 1, quantum=64, cap=context)
        out.append(pad_batch(chunk, rows, width, pad_id))
    return out


ROLLOUT_ID_FIELDS = ("prompt_ids", "token_ids", "logprobs", "forced")


def rollout_log(records: Sequence[dict], rewards, advantages, kept) -> list[dict]:
    """What :attr:`LoopConfig.save_rollouts` writes per rollout: the runtime's record without the per-token
    arrays of its threads, plus ``reward``, ``advantage``, ``trained`` (its group was kept for the update)
    and ``choice`` (:func:`apr_jax.rl.objective.parent_choice`)."""
    out = []
    for record, r, a, k in zip(records, rewards, advantages, kept):
        threads = [{key: v for key, v in t.items() if key not in ROLLOUT_ID_FIELDS} for t in record["threads"]]
        out.append({**record, "threads": threads, "reward": float(r), "advantage": float(a), "trained": bool(k),
                    "choice": parent_choice(record)})
    return out


# ------------------------------------------------------------------------------------------ the loop
def rollouts(model_cfg, params, codec: Codec, problems: Sequence[dict], method: str, cfg: GRPOConfig,
             loop: LoopConfig, step: int, eos_id: int, mesh=None) -> list[dict]:
    """``group_size`` sampled thread trees per problem (records with token ids and log-probs).

    With ``mesh`` (when the slots divide over its devices) the engine's slots are split over the same mesh
    as the update, and the parameters stay where the update left them (no copy through the host)."""
    if mesh is not None and loop.slots % sh.batch_axes_size(mesh):
        mesh = None
    engine = Engine(model_cfg, params, slots=loop.slots, eos_id=eos_id, context=loop.context, mesh=mesh,
                    sampling=Sampling(temperature=cfg.temperature, logprob_temperature=cfg.logprob_temperature),
                    stop_sequences=[codec.ids(traces.JOIN_OPEN)],
                    aid=make_aid(loop.aid, codec))
    run = loop.run_config(method, seed=cfg.seed * 1_000_003 + step)
    return Runtime(engine, codec, run).solve(expand_groups(problems, cfg.group_size))


def train(init_dir: str | Path, out_dir: str | Path, cfg: GRPOConfig, loop: LoopConfig = LoopConfig(), *,
          resume: bool = False, problems: Sequence[dict] | None = None, val_problems: Sequence[dict] | None = None,
          progress: bool = True, devices: list | None = None) -> dict:
    """GRPO from the SFT run ``init_dir`` into ``out_dir`` (a run folder ``apr-jax eval`` can read)."""
    from tqdm.auto import tqdm

    from apr_jax.data import datasets, tokenizer as tokenization
    from apr_jax.inference.evaluate import load_run_model
    from apr_jax.train.checkpoint import RunCheckpointer, abstract_like, read_run_config
    from apr_jax.train.metrics import MetricsWriter, truncate_metrics
    from apr_jax.train.sft import _StopOnSignal

    if cfg.temperature != 1.0 and not cfg.tempered_logprobs:
        log.warning("rollouts are sampled at temperature %g but the objective trains the model at temperature 1 "
                    "(off-policy for the objective): rl.tempered_logprobs=true trains the policy that samples "
                    "(docs/rl.md)", cfg.temperature)
    init_record = read_run_config(init_dir)
    method = init_record["method"]
    model_cfg, init_params, tok = load_run_model(init_dir)
    pad, bos, eos = tokenization.special_ids(tok)
    codec = Codec(tok, bos, eos)
    data_dir = Path(init_record["data_dir"])
    if problems is None:
        problems = list(datasets.read_jsonl(data_dir / "problems_train.jsonl"))
    if val_problems is None and loop.eval_every:
        val_problems = list(datasets.read_jsonl(data_dir / "problems_val.jsonl"))[:loop.eval_problems]
    context = loop.context or model_cfg.max_seq_len

    out = Path(out_dir)
    ckpt_dir = out / "checkpoints"
    if not resume and ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir()):
        raise FileExistsError(f"{out.absolute()} already holds checkpoints: pass resume=True to continue")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(init_dir) / "tokenizer.json", out / "tokenizer.json")
    record = {"preset": init_record.get("preset"), "method": method, "model": dataclasses.asdict(model_cfg),
              "rl": dataclasses.asdict(cfg), "loop": dataclasses.asdict(loop), "init": str(Path(init_dir).absolute()),
              "data_dir": str(data_dir)}
    (out / "config.json").write_text(json.dumps(record, indent=1) + "\n")

    mesh = sh.make_mesh((-1, 1), devices)
    sh.check_batch_divisible(loop.micro_batch, mesh, "micro_batch")
    ref_fn, grad_fn, apply_fn, add_fn, optimizer, p_shard, o_shard = compile_fns(model_cfg, cfg, mesh)
    ref_params = jax.device_put(init_params, p_shard)
    checkpointer = RunCheckpointer(ckpt_dir, keep=loop.keep_checkpoints)
    start = 0
    if resume and checkpointer.steps():
        abstract_opt = jax.eval_shape(optimizer.init, init_params)
        start, items = checkpointer.restore(abstract_like(init_params, p_shard), abstract_like(abstract_opt, o_shard))
        params, opt_state = items["params"], items["opt_state"]
        truncate_metrics(out, start)
        log.info("resuming %s from step %d", out, start)
    else:
        params = jax.device_put(init_params, p_shard)
        opt_state = jax.jit(optimizer.init, out_shardings=o_shard)(params)
    writer = MetricsWriter(out)

    def validate(step: int) -> dict:
        _, summary = greedy_evaluate(model_cfg, params, tok, val_problems, loop.run_config(method), slots=loop.slots,
                                     context=loop.context, progress=False, aid=loop.aid)
        values = {k: summary[k] for k in ("accuracy", "mean_total_tokens", "mean_sequential_tokens", "mean_children")}
        writer.write(step, "val", values)
        return values

    history = []
    if loop.eval_every and start == 0:
        history.append({"step": 0, **validate(0)})
    bar = tqdm(total=cfg.steps, initial=start, desc=f"grpo[{method}]", unit="step", disable=not progress)
    with _StopOnSignal() as stop:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            batch_problems = step_problems(problems, cfg, step)
            records = rollouts(model_cfg, params, codec, batch_problems, method, cfg, loop, step, eos, mesh)
            t_roll = time.perf_counter() - t0
            rewards = np.array([reward(r["correct"], r["sequential_tokens"], r["children"], cfg) for r in records],
                               np.float32)
            adv = np.asarray(group_advantages(jnp.asarray(rewards), cfg.group_size, cfg.adv_eps))
            keep = (informative_rollouts(rewards, cfg.group_size) if cfg.skip_uniform_groups
                    else np.ones(len(records), bool))
            kept = [r for r, k in zip(records, keep) if k]
            if loop.save_rollouts:
                (out / "rollouts").mkdir(exist_ok=True)
                datasets.atomic_write_text(out / "rollouts" / f"step_{step + 1:05d}.jsonl", "".join(
                    datasets.dumps(r) + "\n" for r in rollout_log(records, rewards, adv, keep)))
            seqs = rollout_sequences(kept, adv[keep].tolist(), drop_roles=() if cfg.train_children else ("child",))
            batches = micro_batches(seqs, loop.micro_batch, context, pad) if seqs else []
            sharded = [sh.shard_batch(b, mesh) for b in batches]
            loss_tokens = sum(int(b["mask_BT"].sum()) for b in batches)
            # the loss's divisor: rollouts (the paper's aggregation) or loss tokens (token-level)
            divisor = jnp.float32(len(kept) if cfg.aggregation == "tree" else loss_tokens)
            refs = [ref_fn(ref_params, b["inputs_BT"], b["targets_BT"]) for b in sharded]
            t1 = time.perf_counter()
            total, aux, grad_norm = 0.0, [], 0.0
            for _ in range(cfg.inner_updates if sharded else 0):
                total, aux, grads = 0.0, [], None
                for b, ref in zip(sharded, refs):
                    (loss, metrics), g = grad_fn(params, b, ref, divisor)
                    grads = g if grads is None else add_fn(grads, g)
                    total += loss
                    aux.append(metrics)
                params, opt_state, grad_norm = apply_fn(params, opt_state, grads)
            jax.block_until_ready(params)
            t_update = time.perf_counter() - t1
            trained_tokens = loss_tokens * cfg.inner_updates
            generated = sum(t["tokens"] for r in records for t in r["threads"])
            values = {
                "loss": float(total), "reward": float(rewards.mean()),
                "accuracy": float(np.mean([r["correct"] for r in records])),
                "kl": float(sum(m["kl"] for m in aux)),
                "clip_fraction": float(np.mean([m["clip_fraction"] for m in aux])) if aux else 0.0,
                "grad_norm": float(grad_norm), "children": float(np.mean([r["children"] for r in records])),
                "total_tokens": float(np.mean([r["total_tokens"] for r in records])),
                "sequential_tokens": float(np.mean([r["sequential_tokens"] for r in records])),
                "sequences": len(seqs), "kept_rollouts": len(kept),
                **choice_credit([parent_choice(r) for r in records], rewards, adv, cfg.group_size),
                "rollout_s": round(t_roll, 2), "update_s": round(t_update, 2),
                "rollout_tokens_per_s": generated / max(t_roll, 1e-9),
                "update_tokens_per_s": trained_tokens / max(t_update, 1e-9),
            }
            writer.write(step + 1, "train", values)
            history.append({"step": step + 1, **values})
            bar.update(1)
            bar.set_postfix(reward=f"{values['reward']:.2f}", kl=f"{values['kl']:.4f}",
                            roll=f"{t_roll:.0f}s", upd=f"{t_update:.0f}s")
            done = step + 1 == cfg.steps or stop.signal is not None
            if loop.eval_every and ((step + 1) % loop.eval_every == 0 or done):
                val = validate(step + 1)
                history[-1].update({f"val_{k}": v for k, v in val.items()})
                bar.write(f"step {step + 1}: validation accuracy {val['accuracy']:.1%}")
            if (loop.ckpt_every and (step + 1) % loop.ckpt_every == 0) or done:
                checkpointer.save(step + 1, params, opt_state, {"step": step + 1})
            if stop.signal is not None:
                break
    bar.close()
    checkpointer.wait()
    checkpointer.close()
    writer.close()
    plot_rl(out, title=f"GRPO ({method})")
    last = history[-1] if history else {}
    return {"run_dir": str(out), "method": method, "steps": cfg.steps, "start_step": start,
            "last": last, "history_file": str(out / "metrics.jsonl")}


def plot_rl(run_dir: str | Path, title: str | None = None) -> Path | None:
    """Save ``RUN_DIR/rl.png``: mean rollout reward per step and greedy validation accuracy; beside them,
    for an APR run, children per rollout and what the parents chose (:func:`apr_jax.rl.objective.parent_choice`:
    shares of rollouts that spawned, searched on alone, or wrote the join marker themselves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from apr_jax.train.metrics import read_metrics

    records = read_metrics(run_dir)
    train_records = [r for r in records if r.get("split") == "train"]
    train = [(r["step"], r["reward"]) for r in train_records if "reward" in r]
    val = [(r["step"], r["accuracy"]) for r in records if r.get("split") == "val" and "accuracy" in r]
    if not train and not val:
        return None
    spawning = any(r.get("children", 0) > 0 for r in train_records)
    fig, axes = plt.subplots(1, 2 if spawning else 1, figsize=(11 if spawning else 6, 3.5), squeeze=False)
    ax = axes[0, 0]
    if train:
        ax.plot(*zip(*train), label="rollout reward (mean)", alpha=0.7)
    if val:
        ax.plot(*zip(*val), "o-", label="validation accuracy (greedy)")
    ax.set_xlabel("RL step")
    ax.set_ylim(-0.02, 1.02)
    ax.legend()
    ax.set_title(title or "GRPO")
    if spawning:
        ax = axes[0, 1]
        steps = [r["step"] for r in train_records]
        ax.plot(steps, [r.get("children", 0) for r in train_records], "k-", label="children per rollout")
        ax.set_xlabel("RL step")
        ax.set_ylabel("children per rollout")
        shares = ax.twinx()
        for choice in PARENT_CHOICES:
            points = [(r["step"], r[f"{choice}_share"]) for r in train_records if f"{choice}_share" in r]
            if points:
                shares.plot(*zip(*points), "--", label=f"share: {choice.replace('_', ' ')}")
        shares.set_ylim(-0.02, 1.02)
        shares.set_ylabel("share of rollouts")
        handles = ax.get_legend_handles_labels()
        extra = shares.get_legend_handles_labels()
        ax.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=8, loc="upper right")
        ax.set_title("what the parents chose")
    fig.tight_layout()
    path = Path(run_dir) / "rl.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
