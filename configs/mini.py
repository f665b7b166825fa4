"""CPU-sized preset: the paper's 4-number task with one token per integer and a ~5M-parameter model.

Sizes chosen by measurement on a 2-core CPU (docs/experiments.md): 4 input numbers up to 99 as in the paper (at 3
numbers an APR parent's longest call is as long as a whole SoS+ trace, so the context-window comparison cannot
show); integers below 1,000 are single tokens, which shortens SoS+ demonstrations from 1,436 to 1,139 tokens on
average and removes multi-digit arithmetic from what the model must write; solver settings are the paper's (the
SoS+ solver solves 53% of these problems, the APR solver 72%: the ceilings of imitation).
"""

from apr_jax.data.config import DataConfig
from apr_jax.model import config as model_config
from apr_jax.presets import Preset
from apr_jax.rl.config import GRPOConfig
from apr_jax.train import config as train_config
from configs._common import model_vocab


def get_config() -> Preset:
    data = DataConfig(num_train=20_000, num_val=500, number_mode="integers", max_int_digits=3, context=4096,
                      chunk_size=500)
    return Preset(name="mini", data=data, model=model_config.mini(model_vocab(data)), train=train_config.mini(
        # a short CPU run needs a larger step than the paper's 5e-5 (which spans 19,000 steps of 256)
        init_lr=1e-4, peak_lr=1e-3, end_lr=1e-5, warmup_steps=50), rl=GRPOConfig(problems_per_step=8, steps=20))
