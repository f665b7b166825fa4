"""Presets: ``tiny`` (tests), ``mini`` (CPU runs), ``paper`` (the paper's 228M setting).

Each module exposes ``get_config() -> apr_jax.presets.Preset``. Load one with ``apr_jax.presets.load(name)``.
"""
