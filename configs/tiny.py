"""Test preset: 3 small numbers, a few dozen problems, a tiny model: every stage runs in seconds."""

from apr_jax.data.config import DataConfig
from apr_jax.model import config as model_config
from apr_jax.presets import Preset
from apr_jax.rl.config import GRPOConfig
from apr_jax.train import config as train_config
from configs._common import model_vocab


def get_config() -> Preset:
    data = DataConfig(num_inputs=3, max_num=20, min_target=10, max_target=30, num_train=64, num_val=16,
                      sosp_max_beam=3, apr_max_beam=3, apr_max_sub_beam=5, context=1024, chunk_size=16)
    return Preset(name="tiny", data=data, model=model_config.tiny(model_vocab(data), max_seq_len=1024),
                  train=train_config.tiny(), rl=GRPOConfig(problems_per_step=2, group_size=2, steps=2))
