"""Parameters of a Llama-family decoder: a pytree of arrays, layers stacked for ``lax.scan``.

Conventions, fixed here for the forward pass and every weight loader:

- Linear weights are ``[in, out]`` and applied as ``x @ w`` (Hugging Face ``nn.Linear`` stores
  ``[out, in]``; loaders transpose).
- Query and key projections are in Hugging Face's rotary layout: each head's ``head_dim`` is two
  halves rotated against each other (``rotate_half``). GGUF files store them interleaved, as
  llama.cpp's converter permutes them; the GGUF loader undoes that permutation.
- Per-layer tensors carry a leading layer axis ``L``.
- ``lm_head`` is None when the embeddings are tied (the output projection is ``embed.T``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from symphony_jax.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerParams:
    """All decoder layers, stacked (L layers, H hidden, Q = heads * head_dim, K = kv_heads *
    head_dim, F intermediate)."""

    attn_norm: jax.Array  # [L, H]     RMSNorm weight before attention
    wq: jax.Array  # [L, H, Q]
    wk: jax.Array  # [L, H, K]
    wv: jax.Array  # [L, H, K]
    wo: jax.Array  # [L, Q, H]
    mlp_norm: jax.Array  # [L, H]      RMSNorm weight before the MLP
    w_gate: jax.Array  # [L, H, F]
    w_up: jax.Array  # [L, H, F]
    w_down: jax.Array  # [L, F, H]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LlamaParams:
    embed: jax.Array  # [V, H]
    layers: LayerParams
    final_norm: jax.Array  # [H]
    lm_head: jax.Array | None  # [H, V]; None: tied to embed


def expected_shapes(config: ModelConfig) -> LlamaParams:
    """The shape of every parameter (as tuples) for ``config``."""
    L, H, F, V = (config.num_layers, config.hidden_size, config.intermediate_size,
                  config.vocab_size)
    Q, K = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    return LlamaParams(
        embed=(V, H),
        layers=LayerParams(attn_norm=(L, H), wq=(L, H, Q), wk=(L, H, K), wv=(L, H, K),
                           wo=(L, Q, H), mlp_norm=(L, H), w_gate=(L, H, F), w_up=(L, H, F),
                           w_down=(L, F, H)),
        final_norm=(H,),
        lm_head=None if config.tie_word_embeddings else (H, V),
    )


def init_params(config: ModelConfig, key: jax.Array, dtype=None) -> LlamaParams:
    """Random weights for any geometry (systems experiments: timings do not depend on values).

    Matrices are normal with standard deviation ``1 / sqrt(fan_in)`` (the embedding: ``1 /
    sqrt(hidden)``) so activations keep their scale through the layers; norm weights are ones.
    """
    dtype = jnp.dtype(dtype or config.dtype)
    shapes = expected_shapes(config)
    keys = iter(jax.random.split(key, 9))

    def matrix(shape, fan_in=None):
        std = (fan_in or shape[-2]) ** -0.5
        return (jax.random.normal(next(keys), shape, jnp.float32) * std).astype(dtype)

    s = shapes.layers
    return LlamaParams(
        embed=matrix(shapes.embed, fan_in=config.hidden_size),
        layers=LayerParams(attn_norm=jnp.ones(s.attn_norm, dtype), wq=matrix(s.wq),
                           wk=matrix(s.wk), wv=matrix(s.wv), wo=matrix(s.wo),
                           mlp_norm=jnp.ones(s.mlp_norm, dtype), w_gate=matrix(s.w_gate),
                           w_up=matrix(s.w_up), w_down=matrix(s.w_down)),
        final_norm=jnp.ones(shapes.final_norm, dtype),
        lm_head=None if shapes.lm_head is None else matrix(shapes.lm_head),
    )


def num_params(params: LlamaParams) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
