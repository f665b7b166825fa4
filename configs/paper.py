"""The paper's setting (Pan et al. 2025): 500K/1K problems with 4 numbers in 1..99, targets 10..100, the
228M Llama-2 model with a 4,096 context, and the SFT recipe (batch 256, 19,000 steps)."""

from apr_jax.data.config import DataConfig
from apr_jax.model import config as model_config
from apr_jax.presets import Preset
from apr_jax.rl.config import GRPOConfig
from apr_jax.train import config as train_config
from configs._common import model_vocab


def get_config() -> Preset:
    data = DataConfig(num_train=500_000, num_val=1_000, number_mode="digits", context=4096)
    return Preset(name="paper", data=data, model=model_config.paper(model_vocab(data)),
                  train=train_config.paper(), rl=GRPOConfig())
