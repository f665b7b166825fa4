"""Fused CPU kernels for decoding and training, as XLA FFI custom calls.

* ``csrc/decode_attention.cc``: single-query attention over the KV cache. XLA:CPU runs decode attention as
  rows x heads tiny batched dots with a fixed cost each; the kernel does the same exact softmax attention as
  one sweep per (row, kv head) over the cache, read in place.
* ``csrc/packed_matmul.cc``: ``x[M, K] @ W[K, N]`` for the few rows of a decode step, against a weight
  packed once into column panels (:func:`pack`). XLA's generic dot runs these small-row products far below
  the core's FMA rate; the kernel's register-blocked tiles run close to it.
* ``csrc/train_attention.cc``: exact attention over whole sequences, forward (output and log-sum-exp) and
  backward (dq, dk, dv from the saved log-sum-exp), for SFT and GRPO updates. XLA:CPU runs the blockwise
  attention's per-score work as separate memory-bound passes; the kernel fuses them (docs/training.md).

All are compiled on first use, into one library, with the system C++ compiler (``$CXX``, else
``g++``/``c++``) against the FFI headers that jaxlib ships, and cached under ``$APR_JAX_KERNEL_CACHE``
(default ``~/.cache/apr_jax/kernels``), keyed by the sources, the flags, the jaxlib version and the CPU.
Nothing is downloaded. Without a compiler, or with ``APR_JAX_CPU_KERNELS=0`` (the older name
``APR_JAX_DECODE_KERNEL=0`` works too), :func:`available` is False and the model uses its pure-XLA path (same
results to fp32 rounding); the reason is logged once.
Measured effect on decoding: docs/inference.md.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

TARGET = "apr_decode_attention"
MATMUL_TARGET = "apr_packed_matmul"
TRAIN_FWD_TARGET = "apr_train_attention_fwd"
TRAIN_BWD_TARGET = "apr_train_attention_bwd"
_CSRC = Path(__file__).with_name("csrc")
_SOURCES = tuple(_CSRC / name for name in ("decode_attention.cc", "packed_matmul.cc", "train_attention.cc"))
_HEADERS = (_CSRC / "tile.h", _CSRC / "parallel.h")
# -ffast-math lets the compiler vectorise the dot products' sums and the exponentials (glibc's libmvec): a
# different summation order from XLA's, i.e. fp32 rounding differences only (measured: 1.04x faster at 170
# cached tokens, 1.28x at 2,000, than without it).
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-ffast-math", "-lmvec")


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
        model = next((line for line in text.splitlines() if line.startswith("model name")), "")
        return model + flags
    except OSError:
        return platform.processor() or platform.machine()


def _build(compiler: str) -> Path:
    import jaxlib

    source = b"\0".join(path.read_bytes() for path in _SOURCES + _HEADERS)
    key = hashlib.sha256(b"\0".join([source, " ".join(_FLAGS).encode(), jaxlib.__version__.encode(),
                                     _cpu_id().encode(), compiler.encode()])).hexdigest()[:16]
    cache = Path(os.environ.get("APR_JAX_KERNEL_CACHE", Path.home() / ".cache" / "apr_jax" / "kernels"))
    lib = cache / f"apr_kernels_{key}.so"
    if lib.exists():
        return lib
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:  # e.g. a read-only home: build where the process can write
        cache = Path(tempfile.gettempdir()) / "apr_jax_kernels"
        cache.mkdir(parents=True, exist_ok=True)
        lib = cache / lib.name
        if lib.exists():
            return lib
    import fcntl

    # One builder at a time per cache (parallel test workers, several jobs started together): the others
    # wait on the lock and then find the library built.
    with open(cache / f"{lib.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if lib.exists():
            return lib
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        cmd = [compiler, *_FLAGS, "-I", jax.ffi.include_dir(), *map(str, _SOURCES), "-o", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
            os.replace(tmp, lib)  # atomic: a reader never sees a partly written library
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return lib


_PANEL = [0]  # the packed layout's panel width, read from the loaded library


@functools.cache
def available() -> bool:
    """Whether the CPU kernels are compiled, loaded and registered for the CPU platform."""
    switches = (os.environ.get("APR_JAX_CPU_KERNELS", "1"), os.environ.get("APR_JAX_DECODE_KERNEL", "1"))
    if any(value.lower() in ("0", "false", "no", "off") for value in switches):
        log.info("fused CPU kernels disabled by APR_JAX_CPU_KERNELS")
        return False
    compiler = _compiler()
    if compiler is None:
        log.warning("no C++ compiler found ($CXX, g++, c++, clang++): on CPU, decoding and training use XLA "
                    "attention and matmuls, which are several times slower (docs/inference.md, docs/training.md)")
        return False
    try:
        import ctypes

        lib = ctypes.cdll.LoadLibrary(str(_build(compiler)))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.AprDecodeAttention), platform="cpu")
        jax.ffi.register_ffi_target(MATMUL_TARGET, jax.ffi.pycapsule(lib.AprPackedMatmul), platform="cpu")
        jax.ffi.register_ffi_target(TRAIN_FWD_TARGET, jax.ffi.pycapsule(lib.AprTrainAttentionForward), platform="cpu")
        jax.ffi.register_ffi_target(TRAIN_BWD_TARGET, jax.ffi.pycapsule(lib.AprTrainAttentionBackward), platform="cpu")
        lib.AprPackedPanelWidth.restype = ctypes.c_int64
        _PANEL[0] = int(lib.AprPackedPanelWidth())
    except Exception as err:  # a failed build must not stop inference: fall back to XLA
        log.warning("fused CPU kernels unavailable (%s: %s); using XLA attention and matmuls",
                    type(err).__name__, err)
        return False
    return True


CACHE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.uint16))  # uint16: bf16 bits


def decode_attention(q_BNH: jax.Array, k_LBKSH: jax.Array, v_LBKSH: jax.Array, layer, limit_B: jax.Array,
                     scale: float) -> jax.Array:
    """Query ``q_BNH`` of each row attends to the first ``limit_B[b]`` slots of ``layer`` of the cache.

    Exact softmax attention in fp32 over a float32 or bfloat16 cache (widened on load; a uint16 cache holds
    bf16 bit patterns, :data:`apr_jax.model.kv_cache.BF16_BITS`); a row with limit 0 gets zeros. CPU only:
    call under ``lax.platform_dependent`` (or after checking the backend) and only when :func:`available`.
    """
    if q_BNH.dtype != jnp.float32 or k_LBKSH.dtype != v_LBKSH.dtype or k_LBKSH.dtype not in CACHE_DTYPES:
        raise TypeError("decode_attention takes float32 queries and a float32 or bfloat16 (or uint16 bits) cache, "
                        f"got queries {q_BNH.dtype}, keys {k_LBKSH.dtype}, values {v_LBKSH.dtype}")
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q_BNH.shape, jnp.float32),
                            vmap_method="sequential")
    return call(q_BNH, k_LBKSH, v_LBKSH, jnp.asarray(layer, jnp.int32), limit_B.astype(jnp.int32),
                scale=np.float32(scale))


def panel_width() -> int:
    """Columns per panel of the packed weight layout (32 with AVX-512, else 16). Needs :func:`available`."""
    if not available():
        raise RuntimeError("the CPU kernels are not available (see the log for why)")
    return _PANEL[0]


def pack(w_KN: jax.Array) -> jax.Array:
    """``[K, N]`` weight -> ``[ceil(N / P), K, P]`` column panels of width :func:`panel_width`, zero-padded.

    Done once per decoding run (outside the loop): the layout lets :func:`packed_matmul` stream each panel
    in order while a tile of rows reuses every loaded panel row.
    """
    if w_KN.ndim != 2:
        raise ValueError(f"pack takes a [K, N] matrix, got shape {w_KN.shape}")
    p = panel_width()
    k, n = w_KN.shape
    panels = -(-n // p)
    w_KN = jnp.pad(w_KN.astype(jnp.float32), ((0, 0), (0, panels * p - n)))
    return w_KN.reshape(k, panels, p).transpose(1, 0, 2)


def packed_matmul(x_MK: jax.Array, w_PKC: jax.Array, n: int) -> jax.Array:
    """``x_MK @ W[:, :n]`` for ``W`` packed by :func:`pack`: fp32, ``[M, n]``. CPU only (see above)."""
    if x_MK.dtype != jnp.float32 or w_PKC.dtype != jnp.float32:
        raise TypeError("packed_matmul takes float32 inputs")
    call = jax.ffi.ffi_call(MATMUL_TARGET, jax.ShapeDtypeStruct((x_MK.shape[0], n), jnp.float32),
                            vmap_method="sequential")
    return call(x_MK, w_PKC)


def _mask_operands(spec):
    return tuple(x.astype(jnp.int32) for x in (spec.q_slot_BT, spec.q_seg_BT, spec.k_seg_BS, spec.k_limit_B))


def train_attention(q_BKGTH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array, spec, scale: float):
    """Exact attention over whole sequences: ``(out [B, K, G, T, H], lse [B, K, G, T])`` (fp32, CPU only).

    ``spec`` is the model's ``MaskSpec`` (causal slot, segments, valid length per row); a query that sees
    no key gets output 0 and log-sum-exp 0. The backward pass is :func:`train_attention_grad`.
    """
    if not all(x.dtype == jnp.float32 for x in (q_BKGTH, k_BKSH, v_BKSH)):
        raise TypeError("train_attention takes float32 queries, keys and values")
    b, kh, g, t, _ = q_BKGTH.shape
    call = jax.ffi.ffi_call(TRAIN_FWD_TARGET, (jax.ShapeDtypeStruct(q_BKGTH.shape, jnp.float32),
                                               jax.ShapeDtypeStruct((b, kh, g, t), jnp.float32)),
                            vmap_method="sequential")
    return call(q_BKGTH, k_BKSH, v_BKSH, *_mask_operands(spec), scale=np.float32(scale))


def train_attention_grad(q_BKGTH, k_BKSH, v_BKSH, out_BKGTH, lse_BKGT, dout_BKGTH, spec, scale: float):
    """``(dq, dk, dv)`` of :func:`train_attention` for the output cotangent ``dout`` (probabilities
    recomputed from the saved log-sum-exp)."""
    call = jax.ffi.ffi_call(TRAIN_BWD_TARGET, (jax.ShapeDtypeStruct(q_BKGTH.shape, jnp.float32),
                                               jax.ShapeDtypeStruct(k_BKSH.shape, jnp.float32),
                                               jax.ShapeDtypeStruct(v_BKSH.shape, jnp.float32)),
                            vmap_method="sequential")
    return call(q_BKGTH, k_BKSH, v_BKSH, out_BKGTH, lse_BKGT, dout_BKGTH.astype(jnp.float32),
                *_mask_operands(spec), scale=np.float32(scale))
