"""Export to / import from a Hugging Face ``LlamaForCausalLM`` directory (no torch needed).

The mapping between our parameter tree and the HF state dict is the declarative table :data:`HF_TABLE`.
Every HF linear weight is ``[out_features, in_features]``; ours are einsum kernels ``[*in, *out]``, so a
kernel is flattened to 2-D at its ``in_axes`` boundary and transposed. Block weights carry a leading layer
axis in our tree and become one HF tensor per layer (``{i}`` in the name).

Written files: ``config.json``, ``generation_config.json``, ``model.safetensors`` and, when a
``tokenizer.json`` is given, a copy of it plus ``tokenizer_config.json`` and ``special_tokens_map.json``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from apr_jax.model import llama
from apr_jax.model.config import LlamaConfig

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


class Entry(NamedTuple):
    """One parameter: our tree path, the HF name, whether it is per layer, and its linear layout.

    ``in_axes`` is None for vectors/tables copied as is; otherwise our array (without the layer axis) is
    reshaped to ``[prod(shape[:in_axes]), -1]`` and transposed to HF's ``[out, in]``.
    """

    path: tuple[str, ...]
    hf_name: str
    per_layer: bool
    in_axes: int | None


HF_TABLE = (
    Entry(("embedding",), "model.embed_tokens.weight", False, None),  # [V, D] both
    Entry(("layers", "attn_norm", "scale"), "model.layers.{i}.input_layernorm.weight", True, None),
    Entry(("layers", "attn", "wq"), "model.layers.{i}.self_attn.q_proj.weight", True, 1),  # [D, N, H]
    Entry(("layers", "attn", "wk"), "model.layers.{i}.self_attn.k_proj.weight", True, 1),  # [D, K, H]
    Entry(("layers", "attn", "wv"), "model.layers.{i}.self_attn.v_proj.weight", True, 1),  # [D, K, H]
    Entry(("layers", "attn", "wo"), "model.layers.{i}.self_attn.o_proj.weight", True, 2),  # [N, H, D]
    Entry(("layers", "mlp_norm", "scale"), "model.layers.{i}.post_attention_layernorm.weight", True, None),
    Entry(("layers", "mlp", "w_gate"), "model.layers.{i}.mlp.gate_proj.weight", True, 1),  # [D, F]
    Entry(("layers", "mlp", "w_up"), "model.layers.{i}.mlp.up_proj.weight", True, 1),  # [D, F]
    Entry(("layers", "mlp", "w_down"), "model.layers.{i}.mlp.down_proj.weight", True, 1),  # [F, D]
    Entry(("final_norm", "scale"), "model.norm.weight", False, None),
    Entry(("lm_head",), "lm_head.weight", False, 1),  # [D, V]
)


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _to_hf(array: np.ndarray, in_axes: int | None) -> np.ndarray:
    if in_axes is None:
        return np.ascontiguousarray(array)
    return np.ascontiguousarray(array.reshape(math.prod(array.shape[:in_axes]), -1).T)


def _from_hf(tensor: np.ndarray, in_axes: int | None, shape: tuple[int, ...]) -> np.ndarray:
    return tensor.reshape(shape) if in_axes is None else tensor.T.reshape(shape)


def _check_tree(cfg: LlamaConfig, params) -> None:
    expected = {e.path for e in HF_TABLE}
    actual = {tuple(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    if actual != expected:
        raise ValueError(
            f"parameter tree does not match the HF table: missing {expected - actual}, "
            f"unexpected {actual - expected}"
        )
    shapes = jax.eval_shape(lambda: llama.init(cfg, jax.random.key(0)))
    for entry in HF_TABLE:
        want, got = _get(shapes, entry.path).shape, _get(params, entry.path).shape
        if want != got:
            raise ValueError(f"parameter {'/'.join(entry.path)} has shape {got}, config implies {want}")


def hf_config(cfg: LlamaConfig, bos_id: int = 1, eos_id: int = 2, pad_id: int = 0) -> dict:
    """The ``config.json`` contents of a ``transformers.LlamaConfig`` for ``cfg``."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers < 5
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # transformers >= 5
        "initializer_range": cfg.init_std,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
    }


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _write_tokenizer(tokenizer_json_path: str, out_dir: str, ids: dict, max_len: int) -> None:
    """Copy ``tokenizer.json`` and describe it as a ``PreTrainedTokenizerFast`` with Llama-2 specials."""
    import tokenizers

    tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_json_path))
    for role, token in SPECIAL_TOKENS.items():
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{tokenizer_json_path} has no {role} {token!r}")
        if role in ids and token_id != ids[role]:
            raise ValueError(
                f"{tokenizer_json_path} maps {token!r} to {token_id}, but {role} id is {ids[role]}"
            )
    shutil.copyfile(tokenizer_json_path, os.path.join(out_dir, "tokenizer.json"))
    _write_json(
        os.path.join(out_dir, "tokenizer_config.json"),
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **SPECIAL_TOKENS,
            "model_max_length": max_len,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        },
    )
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), dict(SPECIAL_TOKENS))


def export_hf(
    cfg: LlamaConfig,
    params,
    out_dir: str,
    tokenizer_json_path: str | None = None,
    bos_id: int = 1,
    eos_id: int = 2,
    pad_id: int = 0,
) -> None:
    """Write ``params`` as a standard Llama directory loadable by ``LlamaForCausalLM.from_pretrained``."""
    _check_tree(cfg, params)
    os.makedirs(out_dir, exist_ok=True)
    tensors = {}
    for entry in HF_TABLE:
        array = np.asarray(_get(params, entry.path), np.float32)
        if entry.per_layer:
            for i in range(cfg.num_layers):
                tensors[entry.hf_name.format(i=i)] = _to_hf(array[i], entry.in_axes)
        else:
            tensors[entry.hf_name] = _to_hf(array, entry.in_axes)
    path = os.path.join(out_dir, "model.safetensors")
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})  # "pt": transformers checks it
    _write_json(os.path.join(out_dir, "config.json"), hf_config(cfg, bos_id, eos_id, pad_id))
    _write_json(
        os.path.join(out_dir, "generation_config.json"),
        {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id},
    )
    if tokenizer_json_path is not None:
        ids = {"bos_token": bos_id, "eos_token": eos_id, "pad_token": pad_id}
        _write_tokenizer(tokenizer_json_path, out_dir, ids, cfg.max_seq_len)


def _config_from_hf(hf: dict) -> LlamaConfig:
    if hf.get("model_type") != "llama" or hf.get("tie_word_embeddings", False):
        raise ValueError("expected an untied Llama config (model_type 'llama', tie_word_embeddings false)")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        raise ValueError(f"only default RoPE is supported, got {rope or hf.get('rope_scaling')}")
    return LlamaConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        max_seq_len=hf["max_position_embeddings"],
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=float(hf["rms_norm_eps"]),
        init_std=float(hf.get("initializer_range", 0.02)),
    )


def import_hf(hf_dir: str) -> tuple[LlamaConfig, dict]:
    """Read a directory written by :func:`export_hf` (or any untied, bias-free HF Llama) back."""
    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = _config_from_hf(json.load(f))
    tensors = safetensors.numpy.load_file(os.path.join(hf_dir, "model.safetensors"))
    shapes = jax.eval_shape(lambda: llama.init(cfg, jax.random.key(0)))
    params: dict = {}
    for entry in HF_TABLE:
        shape = _get(shapes, entry.path).shape
        layers = range(cfg.num_layers) if entry.per_layer else [None]
        names = [entry.hf_name.format(i=i) for i in layers]
        missing = [name for name in names if name not in tensors]
        if missing:
            raise KeyError(f"{hf_dir}/model.safetensors lacks {missing[0]} (and {len(missing) - 1} more)")
        inner = shape[1:] if entry.per_layer else shape
        arrays = [_from_hf(tensors[name].astype(np.float32), entry.in_axes, inner) for name in names]
        _set(params, entry.path, jnp.asarray(np.stack(arrays) if entry.per_layer else arrays[0]))
    return cfg, params
