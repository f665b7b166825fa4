"""apr-jax: Adaptive Parallel Reasoning (Pan et al. 2025, arXiv 2504.15466) in JAX/Flax."""

__version__ = "0.1.0"
