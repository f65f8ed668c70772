"""Load a local Hugging Face Llama checkpoint: ``config.json`` and safetensors weights.

Tensor names and their parameters (``i``: layer; linear weights are ``[out, in]`` in the file and
transposed to ``[in, out]``)::

    model.embed_tokens.weight                    embed
    model.layers.{i}.input_layernorm.weight      layers.attn_norm[i]
    model.layers.{i}.self_attn.q_proj.weight     layers.wq[i]     (k_proj, v_proj, o_proj alike)
    model.layers.{i}.post_attention_layernorm.weight  layers.mlp_norm[i]
    model.layers.{i}.mlp.gate_proj.weight        layers.w_gate[i] (up_proj, down_proj alike)
    model.norm.weight                            final_norm
    lm_head.weight                               lm_head (absent when tied)

Tensors are read with safetensors' NumPy API, one at a time; torch is never imported.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from symphony_jax.config import DTYPES, ModelConfig, RopeScaling
from symphony_jax.model.params import LlamaParams
from symphony_jax.model.weights import (WeightsError, assemble_params, check_shape,
                                        check_tensor_names, resolve_dtype, tensor_keys)

ARCHITECTURES = ("LlamaForCausalLM",)
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SOURCE_DTYPES = ("F32", "F16", "BF16")

TOP_LEVEL_NAMES = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
                   "lm_head": "lm_head.weight"}
LAYER_NAMES = {
    "attn_norm": "input_layernorm.weight", "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight", "mlp_norm": "post_attention_layernorm.weight",
    "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight",
}
# Buffers some checkpoints carry that are recomputed from the config, never loaded.
DERIVED_SUFFIX = ".rotary_emb.inv_freq"


def hf_tensor_name(field: str, layer: int | None) -> str:
    return TOP_LEVEL_NAMES[field] if layer is None else f"model.layers.{layer}.{LAYER_NAMES[field]}"


def load_hf(directory: str | pathlib.Path, dtype=None) -> tuple[ModelConfig, LlamaParams]:
    """The config and parameters of the Hugging Face Llama checkpoint in ``directory``.

    ``dtype``: of the parameters (and of the returned config); default: the config's ``dtype``
    (``torch_dtype`` before transformers 5), float32 when it has none, as in transformers.
    A ``lm_head.weight`` in a checkpoint with tied embeddings is ignored, as transformers does.
    """
    directory = pathlib.Path(directory)
    config = hf_model_config(directory / "config.json", dtype)
    with contextlib.ExitStack() as stack:
        handles = {path: stack.enter_context(_open_safetensors(path))
                   for path in _weight_files(directory)}
        where = {name: path for path, handle in handles.items() for name in handle.keys()}
        present = {name for name in where if not name.endswith(DERIVED_SUFFIX)}
        if config.tie_word_embeddings:
            present.discard(TOP_LEVEL_NAMES["lm_head"])
        check_tensor_names(str(directory), present,
                           (hf_tensor_name(*key) for key in tensor_keys(config)))

        def read(field: str, layer: int | None, shape: tuple[int, ...]) -> np.ndarray:
            name = hf_tensor_name(field, layer)
            path = where[name]
            tensor = handles[path].get_slice(name)
            if tensor.get_dtype() not in SOURCE_DTYPES:
                raise WeightsError(f"{path}: tensor {name}: dtype {tensor.get_dtype()}, expected "
                                   f"one of {', '.join(SOURCE_DTYPES)}")
            check_shape(f"{path}: tensor {name}", tensor.get_shape(), shape)
            return handles[path].get_tensor(name)

        return config, assemble_params(config, read)


def hf_model_config(path: pathlib.Path, dtype=None) -> ModelConfig:
    """The ``ModelConfig`` a Hugging Face ``config.json`` describes (transformers 4.x or 5.x)."""
    raw = read_json(path)
    architectures = raw.get("architectures") or []
    if not set(ARCHITECTURES) & set(architectures):
        raise WeightsError(f"{path}: architectures={architectures!r}: expected one of "
                           f"{', '.join(ARCHITECTURES)}")
    for key, supported in (("hidden_act", "silu"), ("attention_bias", False),
                           ("mlp_bias", False)):
        if raw.get(key, supported) != supported:
            raise WeightsError(f"{path}: {key}={raw[key]!r}: only {supported!r} is supported")

    def required(key: str) -> Any:
        if key not in raw:
            raise WeightsError(f"{path}: missing {key!r}")
        return raw[key]

    # transformers 5 moved rope_theta and the scaling into one rope_parameters object.
    rope = raw.get("rope_parameters") or {}
    hidden, heads = required("hidden_size"), required("num_attention_heads")
    scaling = _llama3_scaling(path, raw.get("rope_scaling") or rope)
    try:
        return ModelConfig(
            vocab_size=required("vocab_size"),
            hidden_size=hidden,
            intermediate_size=required("intermediate_size"),
            num_layers=required("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or (heads and hidden // heads),
            max_position_embeddings=required("max_position_embeddings"),
            rope_theta=raw.get("rope_theta", rope.get("rope_theta", 10_000.0)),
            rope_scaling=scaling and RopeScaling(**scaling),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            dtype=_config_dtype(path, raw) if dtype is None else resolve_dtype(dtype),
        )
    except WeightsError:
        raise
    except (ValueError, TypeError) as error:  # a field of the wrong type or out of range
        raise WeightsError(f"{path}: {error}") from None


def _llama3_scaling(path: pathlib.Path, scaling: dict) -> dict | None:
    """The ``RopeScaling`` fields of a rope scaling entry; None for no scaling."""
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise WeightsError(f"{path}: rope_type={rope_type!r}: expected 'default' or 'llama3'")
    fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [field for field in fields if field not in scaling]
    if missing:
        raise WeightsError(f"{path}: llama3 rope scaling without {', '.join(missing)}")
    return {field: scaling[field] for field in fields}


def _config_dtype(path: pathlib.Path, raw: dict) -> str:
    name = raw.get("dtype", raw.get("torch_dtype")) or "float32"
    if name not in DTYPES:
        raise WeightsError(f"{path}: dtype={name!r}: expected one of {', '.join(DTYPES)}")
    return name


def _weight_files(directory: pathlib.Path) -> list[pathlib.Path]:
    """The safetensors files of a checkpoint: one file, or the shards its index lists."""
    index, single = directory / INDEX_FILE, directory / SINGLE_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise WeightsError(f"{index}: expected a 'weight_map' object")
        return [directory / name for name in sorted(set(weight_map.values()))]
    if single.is_file():
        return [single]
    raise WeightsError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors "
                       "checkpoints can be loaded)")


@contextlib.contextmanager
def _open_safetensors(path: pathlib.Path):
    if not path.is_file():
        raise WeightsError(f"{path}: missing (listed in {INDEX_FILE})")
    try:
        handle = safe_open(path, framework="numpy")
    except SafetensorError as error:
        raise WeightsError(f"{path}: not a readable safetensors file (truncated or corrupt?): "
                           f"{error}") from None
    with handle:
        yield handle


def read_json(path: pathlib.Path) -> dict:
    if not path.is_file():
        raise WeightsError(f"{path}: missing")
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise WeightsError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(content, dict):
        raise WeightsError(f"{path}: expected a JSON object")
    return content
