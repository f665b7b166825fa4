"""A fused CPU kernel for single-query attention over the KV cache (decoding), as an XLA FFI custom call.

XLA:CPU runs decode attention as rows x heads tiny batched dots with a fixed cost each, so on a CPU that
attention, not the weights, dominates a many-row decode step (docs/inference.md). ``csrc/decode_attention.cc``
does the same exact softmax attention as one sweep per (row, kv head) over the cache, read in place.

The kernel is compiled on first use with the system C++ compiler (``$CXX``, else ``g++``/``c++``) against the
FFI headers that jaxlib ships, and cached under ``$APR_JAX_KERNEL_CACHE`` (default
``~/.cache/apr_jax/kernels``), keyed by the source, the flags, the jaxlib version and the CPU. Nothing is
downloaded. Without a compiler, or with ``APR_JAX_DECODE_KERNEL=0``, :func:`available` is False and the
model uses its pure-XLA path (same results to fp32 rounding); the reason is logged once.
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
_SOURCE = Path(__file__).with_name("csrc") / "decode_attention.cc"
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

    source = _SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(_FLAGS).encode(), jaxlib.__version__.encode(),
                                     _cpu_id().encode(), compiler.encode()])).hexdigest()[:16]
    cache = Path(os.environ.get("APR_JAX_KERNEL_CACHE", Path.home() / ".cache" / "apr_jax" / "kernels"))
    lib = cache / f"decode_attention_{key}.so"
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
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    cmd = [compiler, *_FLAGS, "-I", jax.ffi.include_dir(), str(_SOURCE), "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp, lib)  # atomic: concurrent builders each write their own file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


@functools.cache
def available() -> bool:
    """Whether the decode kernel is compiled, loaded and registered for the CPU platform."""
    if os.environ.get("APR_JAX_DECODE_KERNEL", "1").lower() in ("0", "false", "no", "off"):
        log.info("fused CPU decode attention disabled by APR_JAX_DECODE_KERNEL")
        return False
    compiler = _compiler()
    if compiler is None:
        log.warning("no C++ compiler found ($CXX, g++, c++, clang++): decoding on CPU uses XLA attention, "
                    "which is several times slower at many rows (docs/inference.md)")
        return False
    try:
        import ctypes

        lib = ctypes.cdll.LoadLibrary(str(_build(compiler)))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.AprDecodeAttention), platform="cpu")
    except Exception as err:  # a failed build must not stop inference: fall back to XLA
        log.warning("fused CPU decode attention unavailable (%s: %s); using XLA attention",
                    type(err).__name__, err)
        return False
    return True


def decode_attention(q_BNH: jax.Array, k_LBKSH: jax.Array, v_LBKSH: jax.Array, layer, limit_B: jax.Array,
                     scale: float) -> jax.Array:
    """Query ``q_BNH`` of each row attends to the first ``limit_B[b]`` slots of ``layer`` of the cache.

    Exact softmax attention in fp32; a row with limit 0 gets zeros. CPU only: call under
    ``lax.platform_dependent`` (or after checking the backend) and only when :func:`available`.
    """
    if q_BNH.dtype != jnp.float32 or k_LBKSH.dtype != jnp.float32 or v_LBKSH.dtype != jnp.float32:
        raise TypeError("decode_attention takes float32 queries and caches")
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q_BNH.shape, jnp.float32),
                            vmap_method="sequential")
    return call(q_BNH, k_LBKSH, v_LBKSH, jnp.asarray(layer, jnp.int32), limit_B.astype(jnp.int32),
                scale=np.float32(scale))
