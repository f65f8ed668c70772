import dataclasses

import hypothesis.strategies as st
import pytest
from hypothesis import given

from symphony_jax.config import (MODEL_PRESETS, CacheConfig, EngineConfig, ModelConfig,
                                 RopeScaling, SchedulerConfig, model_preset)

TINY = model_preset("tiny")


def test_presets_are_the_published_geometries():
    llama = model_preset("llama-3.1-8b")
    assert (llama.num_layers, llama.num_heads, llama.num_kv_heads, llama.head_dim) == (32, 32, 8, 128)
    # 128 KiB of K and V per token in bf16: 2 x 32 layers x 8 heads x 128 x 2 bytes.
    assert llama.kv_bytes_per_token() == 131_072
    assert model_preset("llama-2-13b").kv_bytes_per_token() == 2 * 40 * 40 * 128 * 2
    smol = model_preset("smollm2-135m")
    assert smol.tie_word_embeddings and smol.kv_bytes_per_token("float32") == 2 * 30 * 3 * 64 * 4
    assert set(MODEL_PRESETS) == {"tiny", "smollm2-135m", "llama-3.1-8b", "llama-2-13b"}


def test_unknown_preset_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown model preset 'gpt-9'.*tiny, smollm2-135m"):
        model_preset("gpt-9")


@pytest.mark.parametrize("make, message", [
    (lambda: dataclasses.replace(TINY, num_kv_heads=3),
     r"ModelConfig.num_kv_heads=3: expected a divisor of num_heads=4"),
    (lambda: dataclasses.replace(TINY, hidden_size=0), r"ModelConfig.hidden_size=0: expected an integer >= 1"),
    (lambda: dataclasses.replace(TINY, num_layers=2.0), r"ModelConfig.num_layers=2.0"),
    (lambda: dataclasses.replace(TINY, vocab_size=True), r"ModelConfig.vocab_size=True"),
    (lambda: dataclasses.replace(TINY, head_dim=15), r"ModelConfig.head_dim=15: expected an even"),
    (lambda: dataclasses.replace(TINY, rope_theta=-1.0), r"ModelConfig.rope_theta=-1.0: expected a number > 0"),
    (lambda: dataclasses.replace(TINY, dtype="float64"),
     r"ModelConfig.dtype='float64': expected one of float32, bfloat16, float16"),
    (lambda: dataclasses.replace(TINY, rope_scaling={"factor": 8}), r"ModelConfig.rope_scaling="),
    (lambda: dataclasses.replace(TINY, tie_word_embeddings=1), r"ModelConfig.tie_word_embeddings=1"),
    (lambda: RopeScaling(factor=0.5), r"RopeScaling.factor=0.5: expected a number >= 1"),
    (lambda: RopeScaling(low_freq_factor=4.0, high_freq_factor=1.0),
     r"RopeScaling.high_freq_factor=1.0: expected a number > low_freq_factor=4.0"),
    (lambda: CacheConfig(block_size=12), r"CacheConfig.block_size=12: expected a power of two"),
    (lambda: CacheConfig(num_device_blocks=1), r"CacheConfig.num_device_blocks=1: expected an integer >= 2"),
    (lambda: CacheConfig(num_host_blocks=-1), r"CacheConfig.num_host_blocks=-1"),
    (lambda: CacheConfig(num_layer_groups=0), r"CacheConfig.num_layer_groups=0"),
    (lambda: SchedulerConfig(max_num_seqs=0), r"SchedulerConfig.max_num_seqs=0"),
    (lambda: SchedulerConfig(max_num_seqs=8, num_slots=4),
     r"SchedulerConfig.num_slots=4: expected an integer >= 8"),
    (lambda: SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=32),
     r"SchedulerConfig.max_num_batched_tokens=32: expected >= max_num_seqs=64"),
    (lambda: EngineConfig(TINY, scheduler=SchedulerConfig(max_model_len=8192)),
     r"EngineConfig.scheduler.max_model_len=8192: expected <= model.max_position_embeddings=4096"),
    (lambda: EngineConfig(TINY, CacheConfig(num_layer_groups=3), SchedulerConfig(max_model_len=64)),
     r"EngineConfig.cache.num_layer_groups=3: expected <= model.num_layers=2"),
    (lambda: EngineConfig("tiny"), r"EngineConfig.model='tiny': expected a ModelConfig"),
])
def test_bad_values_name_the_field_and_what_is_allowed(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_engine_config_derives_table_geometry():
    config = EngineConfig(TINY, CacheConfig(block_size=16, num_device_blocks=64),
                          SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64,
                                          max_model_len=100))
    assert config.max_blocks_per_seq == 7


@given(layers=st.integers(1, 80), data=st.data())
def test_layer_groups_are_contiguous_balanced_and_ordered(layers, data):
    groups = data.draw(st.integers(1, layers))
    model = dataclasses.replace(TINY, num_layers=layers)
    config = EngineConfig(model, CacheConfig(num_layer_groups=groups),
                          SchedulerConfig(max_model_len=64))
    assignment = config.layer_groups
    assert len(assignment) == layers and assignment[0] == 0 and assignment[-1] == groups - 1
    assert all(b - a in (0, 1) for a, b in zip(assignment, assignment[1:]))
    sizes = [assignment.count(g) for g in range(groups)]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("preset", sorted(MODEL_PRESETS))
def test_every_preset_validates_with_default_cache_and_scheduler(preset):
    assert EngineConfig(model_preset(preset)).max_blocks_per_seq == 4096 // 16


def test_configs_are_frozen_and_hashable():
    config = EngineConfig(TINY)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.model = TINY  # type: ignore[misc]
    assert hash(config) == hash(EngineConfig(TINY))


def test_model_config_accepts_hugging_face_style_values():
    ModelConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                num_kv_heads=1, head_dim=4, max_position_embeddings=32, rope_theta=10_000,
                rope_scaling=RopeScaling(factor=8, original_max_position_embeddings=8192))
