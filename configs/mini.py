"""CPU-sized preset: the paper's 4-number task with fewer problems and a small model.

Sizes are provisional until the experiments measure what a CPU-trained model can learn.
"""

from apr_jax.data.config import DataConfig
from apr_jax.presets import Preset


def get_config() -> Preset:
    data = DataConfig(num_train=20_000, num_val=500, number_mode="digits", context=4096, chunk_size=500)
    return Preset(name="mini", data=data)
