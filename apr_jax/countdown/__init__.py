"""The Countdown task in pure Python: game rules, heuristics, symbolic solvers, and THE trace language.

Nothing in this sub-package imports JAX or any other part of apr_jax.
"""
