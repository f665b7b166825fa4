"""Multi-host runs: ``jax.distributed`` from flags or the environment.

One process per host (or, for tests, several processes on one machine) joins a job with
:func:`initialize` before JAX touches a device; after that ``jax.devices()`` lists every device of every
process and a ``Mesh`` over them spans the hosts. How the pipeline behaves across processes:

- every process builds the same global batch (same seed, same order, padded once for the whole batch) and
  places only its own rows (:func:`apr_jax.train.sharding.shard_batch` with
  ``jax.make_array_from_process_local_data``): batch shapes agree on every host by construction, the data
  iterator's state is the same everywhere (one checkpointed state restores on any number of hosts), and
  the reading is memory-mapped rows, cheap next to a training step;
- checkpoints are written once, cooperatively, by orbax (each process its shards, the primary the metadata)
  and restore onto any device count (``tests/test_sharding.py``);
- run configuration, metrics, plots and progress bars are the primary process's (``process_index() == 0``).

Environment (when the flags are not given): ``APR_JAX_COORDINATOR`` (``host:port`` of process 0),
``APR_JAX_NUM_PROCESSES``, ``APR_JAX_PROCESS_ID``. On Cloud TPU pods and SLURM, ``APR_JAX_DISTRIBUTED=auto``
lets JAX detect all three itself.
"""

from __future__ import annotations

import os

import jax


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Join a multi-process job if flags or environment ask for one; returns whether one was joined."""
    coordinator = coordinator or os.environ.get("APR_JAX_COORDINATOR")
    if num_processes is None and os.environ.get("APR_JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["APR_JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("APR_JAX_PROCESS_ID"):
        process_id = int(os.environ["APR_JAX_PROCESS_ID"])
    auto = os.environ.get("APR_JAX_DISTRIBUTED") == "auto"
    if not coordinator and not auto:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise ValueError("a multi-process run needs the coordinator's address (--coordinator HOST:PORT "
                             "or APR_JAX_COORDINATOR)")
        return False
    if coordinator and (num_processes is None or process_id is None):
        raise ValueError("--coordinator needs --num-processes and --process-id (or APR_JAX_NUM_PROCESSES and "
                         "APR_JAX_PROCESS_ID)")
    if jax.config.jax_platforms in (None, "", "cpu"):
        # cross-process collectives on CPU (tests, CPU clusters); accelerators bring their own
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if auto and not coordinator:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    return True


def is_primary() -> bool:
    """Whether this process writes the run's files (metrics, configs, plots)."""
    return jax.process_index() == 0
