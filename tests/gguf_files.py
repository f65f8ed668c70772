"""Small GGUF files for tests, written the way llama.cpp's converter writes them."""

import pathlib

import gguf
import numpy as np

from symphony_jax.config import ModelConfig
from symphony_jax.model.params import LlamaParams

_TYPES = ((bool, gguf.GGUFValueType.BOOL), (int, gguf.GGUFValueType.UINT32),
          (float, gguf.GGUFValueType.FLOAT32), (str, gguf.GGUFValueType.STRING))


def write_gguf(path: pathlib.Path, architecture: str = "llama", metadata: dict | None = None,
               tensors: dict[str, np.ndarray] | None = None) -> pathlib.Path:
    writer = gguf.GGUFWriter(path, architecture)
    for key, value in (metadata or {}).items():
        if isinstance(value, list):
            writer.add_array(key, value)
        else:
            value_type = next(t for kind, t in _TYPES if isinstance(value, kind))
            writer.add_key_value(key, value, value_type)
    for name, array in (tensors or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_metadata(config: ModelConfig, file_type: gguf.LlamaFileType) -> dict:
    return {
        "llama.block_count": config.num_layers, "llama.context_length":
        config.max_position_embeddings, "llama.embedding_length": config.hidden_size,
        "llama.feed_forward_length": config.intermediate_size,
        "llama.attention.head_count": config.num_heads,
        "llama.attention.head_count_kv": config.num_kv_heads,
        "llama.rope.freq_base": config.rope_theta, "llama.rope.dimension_count": config.head_dim,
        "llama.attention.layer_norm_rms_epsilon": config.rms_norm_eps,
        "llama.vocab_size": config.vocab_size, "general.file_type": int(file_type),
    }


def interleave_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter: within each head, the two rotary halves' rows interleaved."""
    rows, cols = weight.shape
    return (weight.reshape(num_heads, 2, rows // num_heads // 2, cols)
            .swapaxes(1, 2).reshape(rows, cols))


def llama_tensors(config: ModelConfig, params: LlamaParams, dtype) -> dict[str, np.ndarray]:
    """GGUF tensors holding ``params``: ``[out, in]`` matrices, q/k rows interleaved."""
    def matrix(array):
        return np.asarray(array, dtype).T

    layers = params.layers
    tensors = {"token_embd.weight": np.asarray(params.embed, dtype),
               "output_norm.weight": np.asarray(params.final_norm, np.float32)}
    if params.lm_head is not None:
        tensors["output.weight"] = matrix(params.lm_head)
    for i in range(config.num_layers):
        tensors |= {
            f"blk.{i}.attn_norm.weight": np.asarray(layers.attn_norm[i], np.float32),
            f"blk.{i}.attn_q.weight": interleave_rotary_rows(matrix(layers.wq[i]),
                                                             config.num_heads),
            f"blk.{i}.attn_k.weight": interleave_rotary_rows(matrix(layers.wk[i]),
                                                             config.num_kv_heads),
            f"blk.{i}.attn_v.weight": matrix(layers.wv[i]),
            f"blk.{i}.attn_output.weight": matrix(layers.wo[i]),
            f"blk.{i}.ffn_norm.weight": np.asarray(layers.mlp_norm[i], np.float32),
            f"blk.{i}.ffn_gate.weight": matrix(layers.w_gate[i]),
            f"blk.{i}.ffn_up.weight": matrix(layers.w_up[i]),
            f"blk.{i}.ffn_down.weight": matrix(layers.w_down[i]),
        }
    return tensors


def byte_alphabet() -> list[str]:
    """GPT-2's spelling of the 256 bytes as printable characters (byte-level BPE vocabularies)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    spelling = {byte: chr(byte) for byte in printable}
    unprintable = [byte for byte in range(256) if byte not in spelling]
    spelling |= {byte: chr(256 + n) for n, byte in enumerate(unprintable)}
    return [spelling[byte] for byte in range(256)]
