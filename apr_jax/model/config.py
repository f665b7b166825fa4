"""Model configuration: a frozen, hashable dataclass that can be a static argument under ``jax.jit``.

Three presets are provided:

* :func:`paper` -- the 228M Llama-2 style model of Pan et al. (2025): hidden 1024, 18 layers, 16 heads
  of 64, SwiGLU width 2752, context 4096; 227,709,952 non-embedding parameters (227.7M).
* :func:`mini` -- a CPU-sized model of about 4.8M non-embedding parameters with the same context.
* :func:`tiny` -- a test-sized model (hidden 64, 2 layers, grouped KV heads, context 256).
"""

from __future__ import annotations

import dataclasses

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama-2 decoder (pre-norm, RMSNorm, RoPE, SwiGLU, untied embeddings).

    Attributes:
      vocab_size: number of token ids (embedding rows and output logits).
      hidden_size: width ``D`` of the residual stream.
      num_layers: number of transformer blocks.
      num_heads: number of query heads ``N``.
      num_kv_heads: number of key/value heads ``K``; ``N`` must be a multiple of ``K`` (grouped KV).
      head_dim: width ``H`` of one head (even, as RoPE rotates pairs of features).
      intermediate_size: width ``F`` of the SwiGLU MLP.
      max_seq_len: context length (largest position + 1 the model is meant for).
      rope_theta: RoPE base frequency.
      norm_eps: RMSNorm epsilon.
      init_std: standard deviation of the normal initialiser of every weight matrix.
      dtype: compute dtype. ``"float32"``, or ``"bfloat16"``: matmul inputs are cast to bf16 and
        accumulated in fp32; parameters, norms, softmax and logits stay fp32.
      remat: rematerialise each block in the backward pass (saves activation memory when training).
      attention_block: query/key block length of the blockwise (flash) attention.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dtype: str = "float32"
    remat: bool = False
    attention_block: int = 128

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "max_seq_len",
            "attention_block",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LlamaConfig.num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("rope_theta", "norm_eps", "init_std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive number, got {value!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"LlamaConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads

    def num_non_embedding_params(self) -> int:
        """Parameters of the transformer blocks and the final norm (no embedding, no output head)."""
        d, h = self.hidden_size, self.head_dim
        attention = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)  # wq, wo, wk, wv
        mlp = 3 * d * self.intermediate_size  # gate, up, down
        norms = 2 * d
        return self.num_layers * (attention + mlp + norms) + d

    def num_params(self) -> int:
        """All parameters: blocks, final norm, input embedding and (untied) output head."""
        return self.num_non_embedding_params() + 2 * self.vocab_size * self.hidden_size


def paper(vocab_size: int, **overrides) -> LlamaConfig:
    """The paper's 228M model (Llama-2 architecture, 227.7M non-embedding parameters)."""
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=1024,
        num_layers=18,
        num_heads=16,
        num_kv_heads=16,
        head_dim=64,
        intermediate_size=2752,
        max_seq_len=4096,
    )
    return LlamaConfig(**{**fields, **overrides})


def mini(vocab_size: int, **overrides) -> LlamaConfig:
    """A CPU-sized model: hidden 256, 6 layers, 8 heads of 32, SwiGLU 704, context 4096 (4.8M)."""
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=256,
        num_layers=6,
        num_heads=8,
        num_kv_heads=8,
        head_dim=32,
        intermediate_size=704,
        max_seq_len=4096,
    )
    return LlamaConfig(**{**fields, **overrides})


def tiny(vocab_size: int, **overrides) -> LlamaConfig:
    """A test-sized model: hidden 64, 2 layers, 4 query heads sharing 2 KV heads, context 256."""
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        intermediate_size=176,
        max_seq_len=256,
    )
    return LlamaConfig(**{**fields, **overrides})
