"""One H200-class GPU, about 10 minutes end to end: larger SoS+ and APR models on the paper's 4-number task.

Sized from the model's FLOPs, not yet measured on a GPU (docs/experiments.md): a 26M-parameter model (hidden
512, 8 layers, 8 heads of 64, bf16 matmuls, 4,096 context) trained for 600 steps of 32 sequences (about 30M
SoS+ / 25M APR tokens per model, roughly 3-4 minutes each at 30-40% MFU), on 100K problems with one token per
integer below 1,000 (the mini preset's tokenization). ``experiments/gpu_short.sh`` runs it with experiment 1.
"""

from apr_jax.data.config import DataConfig
from apr_jax.model import config as model_config
from apr_jax.presets import Preset
from apr_jax.rl.config import GRPOConfig
from apr_jax.train import config as train_config
from configs._common import model_vocab


def get_config() -> Preset:
    data = DataConfig(num_train=100_000, num_val=1_000, number_mode="integers", max_int_digits=3, context=4096,
                      chunk_size=1000)
    model = model_config.LlamaConfig(vocab_size=model_vocab(data), hidden_size=512, num_layers=8, num_heads=8,
                                     num_kv_heads=8, head_dim=64, intermediate_size=1408, max_seq_len=4096,
                                     dtype="bfloat16", attention_block=512)
    train = train_config.mini(batch_size=32, steps=600, init_lr=1e-4, peak_lr=1e-3, end_lr=1e-5, warmup_steps=50,
                              eval_every=200, ckpt_every=200, eval_batches=8)
    return Preset(name="gpu_short", data=data, model=model, train=train,
                  rl=GRPOConfig(problems_per_step=32, steps=20))
