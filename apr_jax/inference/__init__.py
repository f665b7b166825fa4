"""Inference: generation with a KV cache and the SoS+ / APR orchestration built on apr_jax.countdown.traces."""
