"""Supervised fine-tuning: loss, optimizer, the jitted train step and the training loop.

The objective is next-token cross-entropy over every non-pad token (prompt tokens included), averaged
over the tokens of the whole optimizer step (so gradient accumulation and sharding do not change it).
The optimizer is the paper's: ``clip_by_global_norm(clip)`` then AdamW with a warmup-cosine schedule.

Library entry points: :func:`train` (one SFT run into a run directory, resumable) and :func:`load_run`
(the model config and parameters of a run's latest checkpoint).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from apr_jax.model import llama
from apr_jax.model.config import LlamaConfig
from apr_jax.train import data as data_lib
from apr_jax.train import sharding as sh
from apr_jax.train.checkpoint import (CHECKPOINT_DIR, CONFIG_FILE, RunCheckpointer, abstract_like,
                                      check_resume_config, load_run, model_config_diff, read_run_config,
                                      write_run_config)  # noqa: F401
from apr_jax.train.config import SFTConfig
from apr_jax.train.metrics import MetricsWriter, plot_losses, truncate_metrics

log = logging.getLogger(__name__)
METHODS = ("apr", "sosp")
__all__ = ["TrainState", "compile_fns", "evaluate", "init_state", "load_run", "loss_sums", "make_optimizer",
           "make_schedule", "train", "train_step"]


class TrainState(NamedTuple):
    """Everything the train step updates. ``nonfinite`` counts steps skipped for a non-finite loss/grad."""

    step: jax.Array
    params: Any
    opt_state: Any
    nonfinite: jax.Array


# ----------------------------------------------------------------------------------------------- loss
def next_token_targets(batch: dict) -> tuple[jax.Array, jax.Array]:
    """``(targets [B,T], mask [B,T])``: position t predicts token t+1 when that token is real and in the
    same packed segment; the last position never has a target."""
    tokens, loss_mask, seg = batch["tokens"], batch["loss_mask"], batch["segment_ids"]
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
    mask = loss_mask[:, 1:] & (seg[:, 1:] == seg[:, :-1])
    return targets, jnp.pad(mask, ((0, 0), (0, 1)))


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token cross-entropy in fp32: ``logsumexp(logits) - logits[target]`` (max-shifted, stable)."""
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit


def loss_sums(model_cfg: LlamaConfig, params: Any, batch: dict, packed: bool) -> tuple[jax.Array, jax.Array]:
    """``(sum of token losses, number of loss tokens)`` of a batch."""
    segment_ids = batch["segment_ids"] if packed else None
    logits, _ = llama.forward(model_cfg, params, batch["tokens"], batch["positions"], segment_ids=segment_ids)
    targets, mask = next_token_targets(batch)
    losses = cross_entropy(logits, targets)
    return jnp.sum(jnp.where(mask, losses, 0.0)), jnp.sum(mask, dtype=jnp.float32)


# ------------------------------------------------------------------------------------------ optimizer
def make_schedule(cfg: SFTConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup ``init_lr -> peak_lr`` over ``warmup_steps``, cosine decay to ``end_lr`` at the end."""
    return optax.warmup_cosine_decay_schedule(
        init_value=cfg.init_lr, peak_value=cfg.peak_lr, warmup_steps=cfg.warmup_steps,
        decay_steps=max(total_steps, cfg.warmup_steps + 1), end_value=cfg.end_lr,
    )


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices only: not on norm scales (named ``scale``) or vectors."""
    def keep(path, leaf):
        names = [getattr(k, "key", getattr(k, "name", "")) for k in path]
        return np.ndim(leaf) >= 2 and "scale" not in names
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: SFTConfig, total_steps: int) -> optax.GradientTransformation:
    adamw = optax.adamw(make_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.clip <= 0:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.clip), adamw)


# ------------------------------------------------------------------------------------------ the steps
def _grads(model_cfg, params, batch, grad_accum: int, packed: bool, mesh: Mesh):
    """Summed loss, token count and summed gradients over ``grad_accum`` strided micro-batches."""
    grad_fn = jax.value_and_grad(loss_sums, argnums=1, has_aux=True)
    if grad_accum == 1:
        (loss_sum, count), grads = grad_fn(model_cfg, params, batch, packed)
        return loss_sum, count, grads

    def split(x):  # row r -> micro-batch r % grad_accum keeps every device's rows in every micro-batch
        return x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)

    micro = jax.tree.map(split, batch)
    micro = jax.lax.with_sharding_constraint(micro, NamedSharding(mesh, sh.micro_batch_spec()))

    def body(carry, mb):
        loss_acc, count_acc, grad_acc = carry
        (loss_sum, count), grads = grad_fn(model_cfg, params, mb, packed)
        return (loss_acc + loss_sum, count_acc + count, jax.tree.map(jnp.add, grad_acc, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss_sum, count, grads), _ = jax.lax.scan(body, zeros, micro)
    return loss_sum, count, grads


def train_step(state: TrainState, batch: dict, *, model_cfg, optimizer, schedule, grad_accum, packed, mesh
               ) -> tuple[TrainState, dict]:
    """One optimizer step. A non-finite loss or gradient leaves params and optimizer state unchanged."""
    loss_sum, count, grads = _grads(model_cfg, state.params, batch, grad_accum, packed, mesh)
    denom = jnp.maximum(count, 1.0)
    loss = loss_sum / denom
    grads = jax.tree.map(lambda g: g / denom, grads)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
    new_state = TrainState(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        nonfinite=state.nonfinite + jnp.where(ok, 0, 1).astype(jnp.int32),
    )
    metrics = {"loss": loss, "tokens": count, "grad_norm": grad_norm, "ok": ok,
               "lr": schedule(state.step - state.nonfinite)}
    return new_state, metrics


class Compiled(NamedTuple):
    """The jitted functions of a run (see :func:`compile_fns`)."""

    optimizer: optax.GradientTransformation
    state_shardings: TrainState
    init_params: Callable  # key -> params, created in their shardings
    init_opt: Callable  # params -> optimizer state, created in its shardings
    step: Callable  # (state, batch) -> (state, metrics); donates state
    eval: Callable  # (params, batch) -> (loss_sum, count)


@functools.lru_cache(maxsize=8)
def _param_init(model_cfg: LlamaConfig, mesh: Mesh) -> Callable:
    """``jit(llama.init)`` writing each parameter straight into its sharding (cached per model and mesh)."""
    return sh.sharded_initializer(functools.partial(llama.init, model_cfg), mesh)[0]


# The SFTConfig fields the compiled functions depend on (besides the total step count).
_COMPILE_FIELDS = ("grad_accum", "packing", "init_lr", "peak_lr", "end_lr", "warmup_steps", "b1", "b2", "eps",
                   "weight_decay", "clip")


def compile_fns(model_cfg: LlamaConfig, cfg: SFTConfig, total_steps: int, mesh: Mesh) -> Compiled:
    """The jitted init/step/eval functions for a run. Cached on the fields they depend on, so runs in
    one process that differ only in logging, data or checkpoint settings share compilations."""
    key = SFTConfig(steps=total_steps, batch_size=cfg.grad_accum, **{f: getattr(cfg, f) for f in _COMPILE_FIELDS})
    return _compile_fns(model_cfg, key, total_steps, mesh)


@functools.lru_cache(maxsize=8)
def _compile_fns(model_cfg: LlamaConfig, cfg: SFTConfig, total_steps: int, mesh: Mesh) -> Compiled:
    optimizer = make_optimizer(cfg, total_steps)
    abstract_params = jax.eval_shape(functools.partial(llama.init, model_cfg), jax.random.PRNGKey(0))
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    scalar = sh.replicated(mesh)
    state_shardings = TrainState(step=scalar, params=sh.tree_shardings(abstract_params, mesh),
                                 opt_state=sh.tree_shardings(abstract_opt, mesh), nonfinite=scalar)
    batch_shardings = {k: sh.batch_sharding(mesh) for k in data_lib.BATCH_KEYS}
    step = jax.jit(
        functools.partial(train_step, model_cfg=model_cfg, optimizer=optimizer,
                          schedule=make_schedule(cfg, total_steps), grad_accum=cfg.grad_accum,
                          packed=cfg.packing, mesh=mesh),
        in_shardings=(state_shardings, batch_shardings), out_shardings=(state_shardings, scalar),
        donate_argnums=(0,),
    )
    evaluate = jax.jit(
        functools.partial(loss_sums, model_cfg, packed=False),
        in_shardings=(state_shardings.params, batch_shardings), out_shardings=(scalar, scalar),
    )
    init_opt = jax.jit(optimizer.init, out_shardings=state_shardings.opt_state)
    return Compiled(optimizer, state_shardings, _param_init(model_cfg, mesh), init_opt, step, evaluate)


def init_state(fns: Compiled, key: jax.Array) -> TrainState:
    """Fresh parameters and optimizer state, created directly in their shardings."""
    params = fns.init_params(key)
    opt_state = fns.init_opt(params)
    step, nonfinite = (jax.device_put(np.zeros((), np.int32), fns.state_shardings.step) for _ in range(2))
    return TrainState(step=step, params=params, opt_state=opt_state, nonfinite=nonfinite)


def evaluate(fns: Compiled, params: Any, source, cfg: SFTConfig, pad_id: int, mesh: Mesh,
             prompt_end_id: int | None = None) -> dict:
    """Token-weighted mean loss over (up to ``cfg.eval_batches`` batches of) a validation source (its loss
    tokens chosen as in training: ``prompt_end_id``, see :func:`apr_jax.train.data.continuation_prompt_mask`)."""
    total, count = jnp.zeros(()), jnp.zeros(())
    for batch in data_lib.eval_batches(source, cfg, pad_id, cfg.eval_batches, prompt_end_id):
        loss_sum, n = fns.eval(params, sh.shard_batch(batch, mesh))
        total, count = total + loss_sum, count + n
    total, count = float(total), float(count)
    return {"loss": total / max(count, 1.0), "tokens": count}


# --------------------------------------------------------------------------------------- the run loop
class _StopOnSignal:
    """Turns SIGTERM / SIGINT into a flag checked between steps (a second SIGINT interrupts at once)."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        log.warning("received %s: saving a checkpoint after this step, then stopping",
                    signal.Signals(signum).name)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _restore_or_init(checkpointer: RunCheckpointer, fns: Compiled, model_cfg: LlamaConfig, cfg: SFTConfig,
                     resume: bool) -> tuple[TrainState, dict]:
    """The state to start from and the train record (``step``, ``data`` iterator state, ...)."""
    if resume and checkpointer.steps():
        shardings = fns.state_shardings
        abstract_params = jax.eval_shape(functools.partial(llama.init, model_cfg), jax.random.PRNGKey(0))
        abstract_opt = jax.eval_shape(fns.optimizer.init, abstract_params)
        step, items = checkpointer.restore(abstract_like(abstract_params, shardings.params),
                                           abstract_like(abstract_opt, shardings.opt_state))
        record = items["train"]
        log.info("resuming from %s/%d", checkpointer.directory, step)
        as_scalar = lambda v: jax.device_put(jnp.asarray(v, jnp.int32), shardings.step)  # noqa: E731
        state = TrainState(as_scalar(record["step"]), items["params"], items["opt_state"],
                           as_scalar(record.get("nonfinite", 0)))
        return state, record
    if resume:
        log.info("resume requested but %s holds no checkpoint: starting from scratch", checkpointer.directory)
    state = init_state(fns, jax.random.PRNGKey(cfg.seed))
    return state, {"step": 0, "nonfinite": 0, "data": None, "tokens_seen": 0}


def check_init_run(init_from: str | Path, model_cfg: LlamaConfig, data_dir: str | Path) -> dict:
    """Checks that ``init_from`` is a run this model can start from; returns the ``init`` record."""
    init_dir = Path(init_from)
    old = read_run_config(init_dir)
    diff = model_config_diff(old, model_cfg)
    if diff:
        raise ValueError(f"cannot start from {init_dir}: its model config differs in {', '.join(diff)}")
    ours, theirs = Path(data_dir) / "tokenizer.json", init_dir / "tokenizer.json"
    if ours.exists() and theirs.exists() and ours.read_bytes() != theirs.read_bytes():
        raise ValueError(f"cannot start from {init_dir}: its tokenizer.json differs from {ours} (the token ids "
                         "would mean other things)")
    return {"run": str(init_dir.absolute()), "method": old.get("method"), "step": None}


def _init_params_from(state: TrainState, fns: Compiled, init_from: str | Path, step: int | None
                      ) -> tuple[TrainState, int]:
    """``state`` with the parameters of ``init_from``'s checkpoint (placed as training shards them) and a
    fresh optimizer state for them; returns the state and the checkpoint's step."""
    abstract = jax.eval_shape(lambda: state.params)
    checkpointer = RunCheckpointer(Path(init_from) / CHECKPOINT_DIR, read_only=True)
    restored, items = checkpointer.restore(abstract_like(abstract, fns.state_shardings.params), step=step)
    log.info("parameters from %s step %d (fresh optimizer state and schedule)", init_from, restored)
    return state._replace(params=items["params"], opt_state=fns.init_opt(items["params"])), restored


def _summarise_interval(host: list[dict], steps: list[int]) -> tuple[dict, list[int]]:
    """Reduce the per-step metrics of a log interval; returns the record and the skipped steps."""
    ok = np.array([bool(m["ok"]) for m in host])
    loss = np.array([float(m["loss"]) for m in host])
    tokens = np.array([float(m["tokens"]) for m in host])
    norms = np.array([float(m["grad_norm"]) for m in host])
    good = ok & np.isfinite(loss)
    record = {
        "loss": float((loss[good] * tokens[good]).sum() / max(tokens[good].sum(), 1.0)) if good.any()
        else float("nan"),
        "loss_last": float(loss[-1]),
        "grad_norm": float(norms[good].mean()) if good.any() else float("nan"),
        "lr": float(host[-1]["lr"]),
    }
    return record, [s for s, o in zip(steps, ok) if not o]


class _NullWriter:
    """The metrics writer of non-primary processes."""

    def write(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def save_nonfinite_batch(run_dir: Path, step: int, batch: dict) -> Path:
    """Keep the batch of a step whose loss or gradient was not finite (``RUN/nonfinite/step_N.npz``)."""
    path = Path(run_dir) / "nonfinite" / f"step_{step}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{k: np.asarray(v) for k, v in batch.items()})
    return path


def train(model_cfg: LlamaConfig, sft_cfg: SFTConfig, data_dir: str | Path, method: str, out_dir: str | Path,
          resume: bool = False, *, preset: str | None = None,
          step_callback: Callable[[int], None] | None = None, devices: list | None = None,
          init_from: str | Path | None = None, init_step: int | None = None) -> dict:
    """Run (or, with ``resume``, continue) SFT on ``DATA/arrays/{method}_{train,val}`` into ``out_dir``.

    ``init_from``: start from the parameters of another run's newest checkpoint (or ``init_step``) instead
    of a random initialisation, with a fresh optimizer state and schedule (fine-tuning, e.g. an APR model
    from an SoS+ one). The model configs and vocabularies must agree; ``config.json`` records the run and
    step. A resumed run continues from its own checkpoints and ignores ``init_from``.

    Metrics are read from the device only every ``log_every`` steps. SIGTERM / Ctrl-C stop the run after
    the current step with a checkpoint. ``step_callback(step)`` is called on the host after each step is
    dispatched (for tests and tooling; it must not block on device values). Returns a summary dict.
    """
    from tqdm.auto import tqdm

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    run_dir = Path(out_dir)
    train_src, val_src = data_lib.open_sources(data_dir, method)
    meta = train_src.meta
    if sft_cfg.arith_facts:
        train_src = data_lib.with_fact_sheets(train_src, data_dir, sft_cfg)
    if meta["vocab_size"] > model_cfg.vocab_size:
        raise ValueError(f"the data's vocabulary ({meta['vocab_size']}) exceeds the model's "
                         f"vocab_size ({model_cfg.vocab_size})")
    if sft_cfg.dtype is not None:
        model_cfg = dataclasses.replace(model_cfg, dtype=sft_cfg.dtype)
    if sft_cfg.seq_len > model_cfg.max_seq_len:
        raise ValueError(f"seq_len {sft_cfg.seq_len} exceeds the model's max_seq_len {model_cfg.max_seq_len}")
    ckpt_dir = run_dir / CHECKPOINT_DIR
    if not resume and ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir()):
        raise FileExistsError(f"{run_dir.absolute()} already holds checkpoints: pass resume=True to continue "
                              "that run, or choose a new output directory")
    init_record = None
    if resume and (run_dir / CONFIG_FILE).exists():
        check_resume_config(run_dir, model_cfg, sft_cfg)
        init_record = read_run_config(run_dir).get("init")
    starts_fresh = not (resume and ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir()))
    if init_from is not None and starts_fresh:
        init_record = check_init_run(init_from, model_cfg, data_dir)
    primary = jax.process_index() == 0  # multi-process jobs: one process writes the run's files
    run_dir.mkdir(parents=True, exist_ok=True)
    if primary:
        write_run_config(run_dir, preset=preset, method=method, model_cfg=model_cfg, sft_cfg=sft_cfg,
                         data_dir=data_dir, init=init_record)
        if (Path(data_dir) / "tokenizer.json").exists():
            shutil.copyfile(Path(data_dir) / "tokenizer.json", run_dir / "tokenizer.json")
    warning = data_lib.truncation_report(train_src.lengths, sft_cfg.seq_len)
    if warning:
        log.warning(warning)

    mesh = sh.make_mesh(sft_cfg.mesh, devices)
    sh.check_batch_divisible(sft_cfg.micro_batch_size, mesh, "micro-batch (batch_size / grad_accum)")
    sh.check_batch_divisible(sft_cfg.eval_batch_size or sft_cfg.micro_batch_size, mesh, "validation batch")
    total = sft_cfg.resolve_steps(len(train_src), int(np.minimum(train_src.lengths, sft_cfg.seq_len).sum()))
    fns = compile_fns(model_cfg, sft_cfg, total, mesh)
    checkpointer = RunCheckpointer(ckpt_dir, keep=sft_cfg.keep_checkpoints)
    state, record = _restore_or_init(checkpointer, fns, model_cfg, sft_cfg, resume)
    if init_from is not None and starts_fresh:
        state, init_record["step"] = _init_params_from(state, fns, init_from, init_step)
        if primary:
            write_run_config(run_dir, preset=preset, method=method, model_cfg=model_cfg, sft_cfg=sft_cfg,
                             data_dir=data_dir, init=init_record)
    step, start_step = int(record["step"]), int(record["step"])
    tokens_seen, nonfinite = int(record.get("tokens_seen", 0)), int(record.get("nonfinite", 0))
    if primary:
        truncate_metrics(run_dir, step)

    prompt_end_id = data_lib.continuation_prompt_end_id(data_dir) if sft_cfg.mask_continuation_prompts else None
    iterator = data_lib.train_iterator(train_src, sft_cfg, meta["pad_id"], record.get("data"), prompt_end_id)
    writer = MetricsWriter(run_dir) if primary else _NullWriter()
    bar = tqdm(total=total, initial=step, desc=f"sft[{method}]", unit="step", dynamic_ncols=True,
               disable=not primary)
    pending: list[tuple[int, dict, dict]] = []  # (step, device metrics, host batch) since the last log
    shapes_seen: set[tuple[int, ...]] = set()
    interval_tokens = interval_slots = 0
    t_last, t_start = time.perf_counter(), time.perf_counter()
    last_train, last_val, last_val_step, saved_step = None, None, None, None

    def save() -> None:
        nonlocal saved_step
        meta_record = {"step": step, "nonfinite": nonfinite, "tokens_seen": tokens_seen,
                       "data": iterator.get_state()}
        checkpointer.save(step, state.params, state.opt_state, meta_record)
        saved_step = step

    def validate() -> None:
        nonlocal last_val, last_val_step
        result = evaluate(fns, state.params, val_src, sft_cfg, meta["pad_id"], mesh, prompt_end_id)
        writer.write(step, "val", result)
        last_val, last_val_step = result["loss"], step
        bar.write(f"step {step}: val loss {result['loss']:.4f}")

    try:
        with _StopOnSignal() as stop:
            while step < total and stop.signal is None:
                batch = next(iterator)
                if batch["tokens"].shape not in shapes_seen:
                    shapes_seen.add(batch["tokens"].shape)
                    log.info("step %d: first batch of shape %s (the train step compiles for it)",
                             step + 1, batch["tokens"].shape)
                real = int((batch["segment_ids"] > 0).sum())
                state, metrics = fns.step(state, sh.shard_batch(batch, mesh))
                step += 1
                tokens_seen += real
                interval_tokens += real
                interval_slots += batch["tokens"].size
                pending.append((step, metrics, batch))
                bar.update(1)
                if step % sft_cfg.log_every == 0 or step == total or stop.signal is not None:
                    host = jax.device_get([m for _, m, _ in pending])  # the only per-interval sync
                    now = time.perf_counter()
                    values, skipped = _summarise_interval(host, [s for s, _, _ in pending])
                    if skipped:
                        nonfinite += len(skipped)
                        files = [save_nonfinite_batch(run_dir, s, b) for s, _, b in pending
                                 if s in skipped and primary]
                        log.warning("non-finite loss or gradient at step(s) %s: update not applied; the "
                                    "batches are saved as %s", skipped, ", ".join(map(str, files)))
                    values.update(tokens_per_s=interval_tokens / (now - t_last),
                                  padding_efficiency=interval_tokens / max(interval_slots, 1),
                                  tokens_seen=tokens_seen, nonfinite_steps=nonfinite,
                                  step_time_s=(now - t_last) / len(pending))
                    writer.write(step, "train", values)
                    bar.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{values['tokens_per_s']:.0f}",
                                    lr=f"{values['lr']:.2e}")
                    last_train = values["loss"]
                    pending, interval_tokens, interval_slots, t_last = [], 0, 0, now
                if val_src is not None and sft_cfg.eval_every and step % sft_cfg.eval_every == 0:
                    validate()
                if sft_cfg.ckpt_every and step % sft_cfg.ckpt_every == 0:
                    save()
                if step_callback is not None:
                    step_callback(step)
            interrupted = stop.signal is not None
        if saved_step != step and step > start_step:
            save()
        if val_src is not None and not interrupted and last_val_step != step:
            validate()
    finally:
        bar.close()
        iterator.close()
        del iterator  # grain's reader threads/iterators are freed now, not at interpreter exit
        gc.collect()
        checkpointer.close()
        writer.close()
    if primary:
        plot_losses(run_dir, title=f"SFT {method} ({preset or 'custom'})")
    return {"run_dir": str(run_dir), "method": method, "steps": total, "start_step": start_step,
            "final_step": step, "interrupted": interrupted, "train_loss": last_train, "val_loss": last_val,
            "tokens_seen": tokens_seen, "nonfinite_steps": nonfinite,
            "wall_s": time.perf_counter() - t_start}
