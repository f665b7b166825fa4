"""The paper's setting (Pan et al. 2025): 500K/1K problems with 4 numbers in 1..99, targets 10..100."""

from apr_jax.data.config import DataConfig
from apr_jax.presets import Preset


def get_config() -> Preset:
    data = DataConfig(num_train=500_000, num_val=1_000, number_mode="digits", context=4096)
    return Preset(name="paper", data=data)
