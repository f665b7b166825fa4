"""Orbax checkpoints of an SFT run: parameters, optimizer state and a JSON record of the loop.

One checkpoint (``RUN_DIR/checkpoints/<step>/``) holds three orbax items:

* ``params``: the model parameters (``StandardSave``, sharded arrays written in parallel);
* ``opt_state``: the optax state (Adam moments and the step count that drives the schedule);
* ``train``: JSON with the step, the count of skipped non-finite steps and the grain iterator state,
  so a resumed run sees exactly the batches the uninterrupted run would have seen.

Saves are asynchronous (orbax copies the arrays off the device, then writes in a background thread);
:meth:`RunCheckpointer.wait` blocks until the last save is on disk. Orbax writes each step under a
temporary name and renames it when complete, so a killed save never looks complete; leftover temporary
folders are deleted when the manager opens. A checkpoint that fails to restore is moved aside to
``checkpoints.corrupt/`` and the previous one is used, with a warning; if none restores,
:class:`CheckpointError` names the directory and every error.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

ITEMS = ("params", "opt_state", "train")


class CheckpointError(RuntimeError):
    """No usable checkpoint could be read."""


def abstract_like(tree: Any, shardings: Any | None = None) -> Any:
    """``ShapeDtypeStruct`` tree (with shardings) describing ``tree`` for a restore target."""
    if shardings is None:
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
        )
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class _QuietReadOnly(logging.Filter):
    """Drops orbax's warning that a directory opened read-only is read-only (we asked for that)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Given directory is read only" not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietReadOnly())


class RunCheckpointer:
    """A thin wrapper of ``ocp.CheckpointManager`` for the three items of a run."""

    def __init__(self, directory: str | Path, keep: int = 3, read_only: bool = False, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.read_only = read_only
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"no checkpoint directory at {self.directory}")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep,
            save_interval_steps=0 if read_only else 1,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    # -- saving ---------------------------------------------------------------------------------------
    def save(self, step: int, params: Any, opt_state: Any, train_meta: dict) -> None:
        """Start saving checkpoint ``step`` (returns once the arrays are off the device)."""
        if step in self._manager.all_steps():
            log.info("checkpoint %d already exists in %s; not saving it again", step, self.directory)
            return
        self._manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state),
                train=ocp.args.JsonSave(train_meta),
            ),
            force=True,
        )

    def wait(self) -> None:
        """Block until every pending save is complete on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    # -- restoring ------------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def restore(self, abstract_params: Any, abstract_opt_state: Any | None = None,
                step: int | None = None) -> tuple[int, dict]:
        """Restore the newest readable checkpoint (or exactly ``step``).

        Returns ``(step, items)`` where ``items`` has ``params``, ``train`` and (when
        ``abstract_opt_state`` is given) ``opt_state``. Unreadable checkpoints are skipped with a warning
        (and moved aside unless read-only); raises :class:`CheckpointError` when none is readable.
        """
        candidates = [step] if step is not None else self.steps()[::-1]
        if not candidates:
            raise CheckpointError(f"no checkpoints in {self.directory}")
        errors = []
        for candidate in candidates:
            try:
                return candidate, self._restore_one(candidate, abstract_params, abstract_opt_state)
            except Exception as err:  # orbax raises many types for missing/garbled files
                where = self.directory / str(candidate)
                errors.append(f"{where}: {type(err).__name__}: {err}")
                log.warning("checkpoint %s is unreadable (%s: %s)%s", where, type(err).__name__,
                            str(err)[:300], "; trying the previous one" if candidate != candidates[-1] else "")
                self._quarantine(candidate)
        raise CheckpointError(
            f"no readable checkpoint in {self.directory}; tried steps {candidates}:\n" + "\n".join(errors)
        )

    def _restore_one(self, step: int, abstract_params: Any, abstract_opt_state: Any | None) -> dict:
        items = {"params": ocp.args.StandardRestore(abstract_params), "train": ocp.args.JsonRestore()}
        if abstract_opt_state is not None:
            items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        out = {name: restored[name] for name in items}
        if not isinstance(out["train"], dict) or "step" not in out["train"]:
            raise CheckpointError(f"train record of step {step} is missing or malformed: {out['train']!r}")
        return out

    def _quarantine(self, step: int) -> None:
        """Move an unreadable checkpoint out of the manager's way (kept for inspection)."""
        if self.read_only:
            return
        source = self.directory / str(step)
        if not source.exists():
            return
        target_dir = self.directory.parent / (self.directory.name + ".corrupt")
        target_dir.mkdir(parents=True, exist_ok=True)
        target = target_dir / str(step)
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(source), str(target))
        log.warning("moved unreadable checkpoint %s to %s", source, target)
        self._manager.reload()


# -- run directories ------------------------------------------------------------------------------------
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


def write_run_config(run_dir: str | Path, *, preset: str | None, method: str, model_cfg, sft_cfg,
                     data_dir: str | Path, init: dict | None = None) -> dict:
    """Write ``RUN_DIR/config.json`` (preset name, method, model and train configs, data directory, and
    ``init``: the run and step the parameters started from, when not from a random initialisation)."""
    record = {
        "preset": preset,
        "method": method,
        "model": dataclasses.asdict(model_cfg),
        "train": sft_cfg.to_dict(),
        "data_dir": str(Path(data_dir).absolute()),
        **({"init": init} if init else {}),
    }
    path = Path(run_dir) / CONFIG_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)
    return record


def read_run_config(run_dir: str | Path) -> dict:
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{Path(run_dir).absolute()} is not a run directory (no {CONFIG_FILE})")
    return json.loads(path.read_text())


def load_run(run_dir: str | Path, step: int | None = None):
    """``(model_cfg, params)`` of a run's newest readable checkpoint (or ``step``), on the default device.

    Only the parameters are read (not the optimizer state), so this is cheap enough for inference/export.
    """
    from apr_jax.model import llama
    from apr_jax.model.config import LlamaConfig

    record = read_run_config(run_dir)
    model_cfg = LlamaConfig(**record["model"])
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.eval_shape(functools.partial(llama.init, model_cfg), jax.random.PRNGKey(0))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
    checkpointer = RunCheckpointer(Path(run_dir) / CHECKPOINT_DIR, read_only=True)
    restored_step, items = checkpointer.restore(abstract, step=step)
    log.info("loaded %s step %d", run_dir, restored_step)
    return model_cfg, items["params"]


def model_config_diff(record: dict, model_cfg) -> list[str]:
    """The model-config fields in which a run's ``config.json`` record differs from ``model_cfg``."""
    new_model = dataclasses.asdict(model_cfg)
    return sorted(k for k in set(record["model"]) | set(new_model) if record["model"].get(k) != new_model.get(k))


def check_resume_config(run_dir: Path, model_cfg, cfg) -> None:
    """Resuming needs the same model config (error); changed train fields only warn."""
    old = read_run_config(run_dir)
    diff = model_config_diff(old, model_cfg)
    if diff:
        raise ValueError(f"cannot resume {run_dir}: model config differs in {', '.join(diff)}")
    new_train = cfg.to_dict()
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}  # fields newer than the saved config
    diff = sorted(k for k in new_train if old["train"].get(k, defaults.get(k)) != new_train[k])
    if diff:
        log.warning("resuming %s with changed train config fields %s; the run is no longer an exact "
                    "continuation", run_dir, ", ".join(diff))
