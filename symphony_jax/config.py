"""Configuration: model geometry, KV cache, scheduler, and presets of the geometries we study.

Every config is a frozen dataclass validated on construction; a bad value raises
``ValueError`` naming the class, the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

DTYPES = ("float32", "bfloat16", "float16")


def _fail(obj: Any, field: str, value: Any, expected: str) -> None:
    raise ValueError(f"{type(obj).__name__}.{field}={value!r}: expected {expected}")


def _check_ints(obj: Any, minimum: int, *fields: str) -> None:
    for field in fields:
        value = getattr(obj, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            _fail(obj, field, value, f"an integer >= {minimum}")


def _check_positive_floats(obj: Any, *fields: str) -> None:
    for field in fields:
        value = getattr(obj, field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            _fail(obj, field, value, "a number > 0")


def _check_dtype(obj: Any, field: str) -> None:
    value = getattr(obj, field)
    if value not in DTYPES:
        _fail(obj, field, value, f"one of {', '.join(DTYPES)}")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3 rotary-frequency scaling (``rope_type: llama3`` in Hugging Face configs)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        _check_positive_floats(self, "factor", "low_freq_factor", "high_freq_factor")
        _check_ints(self, 1, "original_max_position_embeddings")
        if self.factor < 1:
            _fail(self, "factor", self.factor, "a number >= 1")
        if self.high_freq_factor <= self.low_freq_factor:
            _fail(self, "high_freq_factor", self.high_freq_factor,
                  f"a number > low_freq_factor={self.low_freq_factor}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Geometry of a Llama-family decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    dtype: str = "bfloat16"

    def __post_init__(self):
        _check_ints(self, 1, "vocab_size", "hidden_size", "intermediate_size", "num_layers",
                    "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings")
        _check_positive_floats(self, "rope_theta", "rms_norm_eps")
        _check_dtype(self, "dtype")
        if self.num_heads % self.num_kv_heads:
            _fail(self, "num_kv_heads", self.num_kv_heads,
                  f"a divisor of num_heads={self.num_heads} (grouped-query attention)")
        if self.head_dim % 2:
            _fail(self, "head_dim", self.head_dim, "an even number (rotary embeddings rotate pairs)")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            _fail(self, "rope_scaling", self.rope_scaling, "a RopeScaling or None")
        if not isinstance(self.tie_word_embeddings, bool):
            _fail(self, "tie_word_embeddings", self.tie_word_embeddings, "a bool")

    @property
    def jnp_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    def kv_bytes_per_token(self, dtype: str | None = None) -> int:
        """Bytes of K and V that one token occupies across all layers."""
        itemsize = jnp.dtype(dtype or self.dtype).itemsize
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache of one node.

    ``num_device_blocks`` counts block 0, the reserved null block, so
    ``num_device_blocks - 1`` blocks hold tokens. ``num_layer_groups`` splits the layers into
    groups with their own block table rows (1: every layer shares one), so that a sequence can
    keep some groups' K,V on the device and not others; the groups share the pool, and a block
    holds ``block_size`` tokens of one group's layers (``pool_layers``).
    """

    block_size: int = 16
    num_device_blocks: int = 1024
    num_host_blocks: int = 0
    num_layer_groups: int = 1

    def pool_layers(self, num_layers: int) -> int:
        """Layers whose K,V one block holds: those of the largest layer group."""
        return -(-num_layers // self.num_layer_groups)

    def __post_init__(self):
        _check_ints(self, 1, "block_size", "num_layer_groups")
        _check_ints(self, 2, "num_device_blocks")
        _check_ints(self, 0, "num_host_blocks")
        if self.block_size & (self.block_size - 1):
            _fail(self, "block_size", self.block_size, "a power of two (kernels tile on it)")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Batch limits of one node's scheduler.

    ``max_num_seqs`` sequences run per step; the request table has ``slots`` entries for
    running, waiting and idle (retained) sessions (``num_slots``, default 4 x max_num_seqs).
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    num_slots: int | None = None

    def __post_init__(self):
        _check_ints(self, 1, "max_num_seqs", "max_num_batched_tokens", "max_model_len")
        if self.num_slots is not None:
            _check_ints(self, self.max_num_seqs, "num_slots")
        if self.max_num_batched_tokens < self.max_num_seqs:
            _fail(self, "max_num_batched_tokens", self.max_num_batched_tokens,
                  f">= max_num_seqs={self.max_num_seqs} (every running sequence decodes a token "
                  "per step)")

    @property
    def slots(self) -> int:
        return self.num_slots or 4 * self.max_num_seqs


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """One node: a model, its KV cache and its scheduler, checked against each other.

    The pool may be smaller than one sequence of ``max_model_len`` (to study memory pressure):
    a request that could never fit is rejected when it arrives.
    """

    model: ModelConfig
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()

    def __post_init__(self):
        for field, cls in (("model", ModelConfig), ("cache", CacheConfig),
                           ("scheduler", SchedulerConfig)):
            if not isinstance(getattr(self, field), cls):
                _fail(self, field, getattr(self, field), f"a {cls.__name__}")
        if self.scheduler.max_model_len > self.model.max_position_embeddings:
            _fail(self, "scheduler.max_model_len", self.scheduler.max_model_len,
                  f"<= model.max_position_embeddings={self.model.max_position_embeddings}")
        if self.cache.num_layer_groups > self.model.num_layers:
            _fail(self, "cache.num_layer_groups", self.cache.num_layer_groups,
                  f"<= model.num_layers={self.model.num_layers} (at most one group per layer)")

    @property
    def max_blocks_per_seq(self) -> int:
        return math.ceil(self.scheduler.max_model_len / self.cache.block_size)

    @property
    def layer_groups(self) -> tuple[int, ...]:
        """The layer group of each layer: contiguous, balanced, lower layers in lower groups."""
        groups, layers = self.cache.num_layer_groups, self.model.num_layers
        return tuple(layer * groups // layers for layer in range(layers))

    @property
    def block_bytes(self) -> int:
        """Bytes of K and V that one block of the pool holds."""
        return (self.model.kv_bytes_per_token() // self.model.num_layers
                * self.cache.pool_layers(self.model.num_layers) * self.cache.block_size)


MODEL_PRESETS: dict[str, ModelConfig] = {
    # Tiny random model for tests: compiles in a second on a 2-core CPU.
    "tiny": ModelConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, max_position_embeddings=4096, dtype="float32"),
    # HuggingFaceTB/SmolLM2-135M(-Instruct).
    "smollm2-135m": ModelConfig(
        vocab_size=49_152, hidden_size=576, intermediate_size=1536, num_layers=30,
        num_heads=9, num_kv_heads=3, head_dim=64, max_position_embeddings=8192,
        rope_theta=100_000.0, tie_word_embeddings=True),
    # meta-llama/Llama-3.1-8B.
    "llama-3.1-8b": ModelConfig(
        vocab_size=128_256, hidden_size=4096, intermediate_size=14_336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=131_072,
        rope_theta=500_000.0, rope_scaling=RopeScaling()),
    # meta-llama/Llama-2-13b-hf.
    "llama-2-13b": ModelConfig(
        vocab_size=32_000, hidden_size=5120, intermediate_size=13_824, num_layers=40,
        num_heads=40, num_kv_heads=40, head_dim=128, max_position_embeddings=4096),
}


def model_preset(name: str) -> ModelConfig:
    """The model geometry registered under ``name`` (see ``MODEL_PRESETS``)."""
    try:
        return MODEL_PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown model preset {name!r}: expected one of {', '.join(MODEL_PRESETS)}") from None
