"""SFT stage: configuration, grain input pipeline, mesh/sharding, orbax checkpoints and the train loop.

Entry points: :func:`train` (one resumable SFT run into a run directory) and :func:`load_run`
(``(model_cfg, params)`` of a run's latest checkpoint). See docs/training.md.
"""

from apr_jax.train.checkpoint import CheckpointError, load_run
from apr_jax.train.config import SFTConfig
from apr_jax.train.sft import train

__all__ = ["CheckpointError", "SFTConfig", "load_run", "train"]
