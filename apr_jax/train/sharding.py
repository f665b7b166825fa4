"""Device mesh and shardings for SFT: data parallelism plus fully-sharded (FSDP) parameters.

The mesh has two axes, ``("data", "fsdp")``. Batches are split over both (every device gets different
rows); parameters and optimizer state are split over ``fsdp`` only (replicated over ``data``), each
array along its largest dimension that ``fsdp`` divides. XLA's SPMD partitioner inserts the all-gathers
of the weights and the reduce-scatters of the gradients. There is no ``pmap``: everything is ``jit`` with
explicit ``in_shardings`` / ``out_shardings``.

All placement decisions go through ONE table, :data:`LOGICAL_AXIS_RULES`, mapping logical axis names to
mesh axes; :func:`logical_to_spec` applies it.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axis (or axes, or None = replicated). The only sharding table.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),  # rows of a batch / activations: split over every device
    ("micro", None),  # the micro-batch index of a gradient-accumulation step
    ("length", None),  # sequence positions
    ("param_shard", "fsdp"),  # the one dimension of a parameter / optimizer moment that FSDP splits
    ("param", None),  # every other parameter dimension
)


def logical_to_spec(axes: tuple[str | None, ...]) -> P:
    """Translate logical axis names to a ``PartitionSpec`` using :data:`LOGICAL_AXIS_RULES`."""
    rules = dict(LOGICAL_AXIS_RULES)
    spec = []
    for name in axes:
        if name is None:
            spec.append(None)
        elif name in rules:
            spec.append(rules[name])
        else:
            raise KeyError(f"logical axis {name!r} has no rule; known: {', '.join(rules)}")
    return P(*spec)


def resolve_mesh_shape(shape: tuple[int, int], num_devices: int) -> tuple[int, int]:
    """Fill a ``-1`` entry of ``(data, fsdp)`` and check the product equals ``num_devices``."""
    data, fsdp = shape
    if data == -1:
        data = num_devices // fsdp
    elif fsdp == -1:
        fsdp = num_devices // data
    if data < 1 or fsdp < 1 or data * fsdp != num_devices:
        raise ValueError(
            f"mesh {tuple(shape)} (data, fsdp) does not fit the {num_devices} available device(s): "
            "data * fsdp must equal the device count"
        )
    return data, fsdp


def make_mesh(shape: tuple[int, int] = (-1, 1), devices: list | None = None) -> Mesh:
    """A ``("data", "fsdp")`` mesh over ``devices`` (default: all), with automatic (GSPMD) axes."""
    devices = list(jax.devices() if devices is None else devices)
    data, fsdp = resolve_mesh_shape(tuple(shape), len(devices))
    grid = np.asarray(devices, dtype=object).reshape(data, fsdp)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def fsdp_size(mesh: Mesh) -> int:
    return mesh.shape["fsdp"]


def batch_axes_size(mesh: Mesh) -> int:
    """How many ways a batch is split (``data * fsdp``)."""
    return math.prod(mesh.shape[a] for a in MESH_AXES)


def param_logical_axes(shape: tuple[int, ...], fsdp: int) -> tuple[str, ...]:
    """Logical axes of a parameter (or optimizer moment) of ``shape``.

    Matrices and larger arrays get ``"param_shard"`` on their largest dimension divisible by ``fsdp``
    (the first such on ties); vectors, scalars and arrays with no divisible dimension stay replicated.
    """
    axes = ["param"] * len(shape)
    if fsdp > 1 and len(shape) >= 2:
        candidates = [(size, -i) for i, size in enumerate(shape) if size % fsdp == 0]
        if candidates:
            _, neg_i = max(candidates)
            axes[-neg_i] = "param_shard"
    return tuple(axes)


def param_sharding(shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    """The sharding of one parameter-like array of ``shape``."""
    return NamedSharding(mesh, logical_to_spec(param_logical_axes(tuple(shape), fsdp_size(mesh))))


def tree_shardings(abstract_tree: Any, mesh: Mesh) -> Any:
    """Shardings for a pytree of parameter-like arrays (params, optimizer state): decided by shape alone,
    so the Adam moments are sharded exactly like their parameters."""
    return jax.tree.map(lambda x: param_sharding(np.shape(x), mesh), abstract_tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a ``[rows, ...]`` batch array of any rank: rows over every device, the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",)))


def micro_batch_spec() -> P:
    """Spec of a ``[micro, rows, T]`` stack of micro-batches."""
    return logical_to_spec(("micro", "batch", "length"))


def check_batch_divisible(rows: int, mesh: Mesh, what: str = "batch") -> None:
    n = batch_axes_size(mesh)
    if rows % n:
        raise ValueError(
            f"{what} of {rows} rows cannot be split over the mesh's data*fsdp = {n} devices; use a "
            f"multiple of {n}"
        )


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Place a host batch on the mesh, rows split over ``(data, fsdp)``. Asynchronous (no host sync).

    In a multi-process job every process holds the same global batch and contributes only its own
    contiguous block of rows (the rows of its devices, which ``make_mesh`` orders by process)."""
    sharding = batch_sharding(mesh)
    processes = jax.process_count()
    if processes == 1:
        return {k: jax.device_put(v, sharding) for k, v in batch.items()}
    index, out = jax.process_index(), {}
    for k, v in batch.items():
        if v.shape[0] % processes:
            raise ValueError(f"{k}: {v.shape[0]} rows cannot be split over {processes} processes")
        rows = v.shape[0] // processes
        out[k] = jax.make_array_from_process_local_data(sharding, v[index * rows:(index + 1) * rows], v.shape)
    return out


def sharded_initializer(init_fn: Callable[[jax.Array], Any], mesh: Mesh) -> tuple[Callable, Any]:
    """``(jit(init_fn, out_shardings=...), shardings)``: each parameter is created directly in its
    sharding, so no full copy of the parameters ever exists on one device. ``init_fn`` takes a raw
    ``jax.random.PRNGKey``."""
    abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    shardings = tree_shardings(abstract, mesh)
    return jax.jit(init_fn, out_shardings=shardings), shardings


def describe(tree: Any) -> str:
    """One line per leaf: path, shape and partition spec (for logs and docs)."""
    lines = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        spec = getattr(getattr(leaf, "sharding", None), "spec", None)
        lines.append(f"{jax.tree_util.keystr(path)}: {tuple(np.shape(leaf))} {spec}")
    return "\n".join(lines)
