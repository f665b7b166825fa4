"""Helpers shared by the preset modules."""

from apr_jax.data.config import DataConfig
from apr_jax.data.tokenizer import build_tokenizer, vocab_size


def model_vocab(data: DataConfig, multiple: int = 64) -> int:
    """Embedding rows for the data's tokenizer, rounded up to a multiple of ``multiple``."""
    n = vocab_size(build_tokenizer(data.number_mode, data.max_int_digits))
    return -(-n // multiple) * multiple
