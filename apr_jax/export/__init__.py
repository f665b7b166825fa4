"""Export of trained models to standard formats (Hugging Face Llama directories)."""

from apr_jax.export.hf import export_hf, import_hf

__all__ = ["export_hf", "import_hf"]
