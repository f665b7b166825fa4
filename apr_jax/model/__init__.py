"""Llama-2 decoder (Flax Linen, used through the pure functions ``init`` and ``forward``) and its KV cache."""

from apr_jax.model.config import LlamaConfig, mini, paper, tiny
from apr_jax.model.kv_cache import KVCache, init_cache, reset, truncate
from apr_jax.model.llama import forward, init, pack_for_cpu_decoding, unstack_layers

__all__ = [
    "KVCache",
    "LlamaConfig",
    "forward",
    "init",
    "init_cache",
    "mini",
    "pack_for_cpu_decoding",
    "paper",
    "reset",
    "tiny",
    "truncate",
    "unstack_layers",
]
