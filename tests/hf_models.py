"""Tiny random transformers Llamas, the reference models of the weight and logit tests."""

from typing import NamedTuple

import pytest

from symphony_jax.config import ModelConfig, RopeScaling

LLAMA3_FIELDS = {"factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 128}
LLAMA3_SCALING = {"rope_type": "llama3"} | LLAMA3_FIELDS



class HfModel(NamedTuple):
    llama_config: dict  # transformers.LlamaConfig arguments
    dtype: str
    max_shard_size: str | None  # None: one model.safetensors
    expected: ModelConfig


HF_MODELS = {
    # GQA 4:1, head_dim apart from hidden / heads, tied, Llama 3 rope scaling, bf16, sharded.
    "gqa4-tied-llama3-bf16-sharded": HfModel(
        dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
             num_attention_heads=8, num_key_value_heads=2, head_dim=16,
             max_position_embeddings=512, tie_word_embeddings=True, rope_theta=50_000.0,
             rope_scaling=LLAMA3_SCALING, rms_norm_eps=1e-5),
        "bfloat16", "24KB",
        ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=3,
                    num_heads=8, num_kv_heads=2, head_dim=16, max_position_embeddings=512,
                    rope_theta=50_000.0, rope_scaling=RopeScaling(4.0, 1.0, 4.0, 128),
                    rms_norm_eps=1e-5, tie_word_embeddings=True, dtype="bfloat16")),
    # GQA 2:1, untied, no scaling, float32, one file; head_dim and eps left to their defaults.
    "gqa2-untied-f32": HfModel(
        dict(vocab_size=128, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             tie_word_embeddings=False),
        "float32", None,
        ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=80, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=256,
                    rms_norm_eps=1e-6, tie_word_embeddings=False, dtype="float32")),
}


def save_hf_model(case: HfModel, directory, dtype: str | None = None):
    """Build ``case`` as a random transformers ``LlamaForCausalLM`` (in ``dtype``, default the
    case's) and save it to ``directory``; returns the torch model."""
    torch = pytest.importorskip("torch", reason="needs torch==2.13.0 to build reference models")
    transformers = pytest.importorskip("transformers", reason="needs transformers (test extra)")
    torch.manual_seed(0)
    # A large initializer_range: values far from zero, so that a misplaced tensor shows.
    config = transformers.LlamaConfig(**case.llama_config, initializer_range=0.5)
    model = transformers.LlamaForCausalLM(config).to(getattr(torch, dtype or case.dtype))
    sharding = {"max_shard_size": case.max_shard_size} if case.max_shard_size else {}
    model.save_pretrained(directory, **sharding)
    return model
