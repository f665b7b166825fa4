"""CPU-sized preset: the paper's 4-number task with fewer problems and a ~4.8M-parameter model.

Sizes are provisional until the experiments measure what a CPU-trained model can learn.
"""

from apr_jax.data.config import DataConfig
from apr_jax.model import config as model_config
from apr_jax.presets import Preset
from apr_jax.rl.config import GRPOConfig
from apr_jax.train import config as train_config
from configs._common import model_vocab


def get_config() -> Preset:
    data = DataConfig(num_train=20_000, num_val=500, number_mode="digits", context=4096, chunk_size=500)
    return Preset(name="mini", data=data, model=model_config.mini(model_vocab(data)), train=train_config.mini(
        # a short CPU run needs a larger step than the paper's 5e-5 (which spans 19,000 steps of 256)
        init_lr=1e-4, peak_lr=1e-3, end_lr=1e-5, warmup_steps=50), rl=GRPOConfig(problems_per_step=8, steps=20))
