"""The same decoder over a contiguous (non-paged) KV cache.

Every sequence owns a fixed run of ``max_len`` cache positions and attention is a dense masked
softmax over them: no block table, no kernels. It is the reference the paged forward is tested
against and the naive generation loop that paged serving is measured against.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from symphony_jax.config import ModelConfig
from symphony_jax.memory import kv_cache
from symphony_jax.model.llama import finish_layer, logits, project_qkv
from symphony_jax.model.params import LlamaParams


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseCache:
    k: jax.Array  # [L, B, max_len, KVH, D]
    v: jax.Array  # [L, B, max_len, KVH, D]
    lengths: jax.Array  # i32[B] tokens cached per sequence


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> DenseCache:
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    dtype = jnp.dtype(dtype or config.dtype)
    return DenseCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                      jnp.zeros(batch, jnp.int32))


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
            scale: float) -> jax.Array:
    """q: [B, S, heads, D] at positions [B, S]; k, v: [B, max_len, kv_heads, D]; each query
    sees cache positions up to its own."""
    B, S, H, D = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(B, S, kv_heads, H // kv_heads, D).astype(jnp.float32)
    scores = jnp.einsum("bskgd,btkd->bkgst", q, k.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST) * scale
    visible = jnp.arange(k.shape[1])[None, None, :] <= positions[:, :, None]  # [B, S, max_len]
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgst,btkd->bskgd", weights, v.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    return out.reshape(B, S, H, D)


@functools.partial(jax.jit, donate_argnames="cache", static_argnames="config")
def forward(params: LlamaParams, cache: DenseCache, token_ids: jax.Array, *,
            config: ModelConfig) -> tuple[jax.Array, DenseCache]:
    """Append ``token_ids: i32[B, S]`` to every sequence (at positions ``lengths[b]`` on) and
    return float32 logits of all of them ``[B, S, V]`` and the grown cache (donated)."""
    B, S = token_ids.shape
    max_len = cache.k.shape[2]
    positions = cache.lengths[:, None] + jnp.arange(S, dtype=jnp.int32)[None, :]
    # Flat (row * max_len + position) cache slots of the new tokens.
    slots = (jnp.arange(B)[:, None] * max_len + positions).reshape(-1)
    x = params.embed[token_ids].reshape(B * S, -1)

    def append(pages, index, new):
        flat = pages.reshape(pages.shape[0], B * max_len, *pages.shape[3:])
        at, new = kv_cache.at_least_two(slots, new, B * max_len)
        return flat.at[index, at].set(new.astype(pages.dtype), mode="drop").reshape(pages.shape)

    def layer_step(carry, xs):
        x, k_cache, v_cache = carry
        layer_params, index = xs
        q, k, v = project_qkv(x, layer_params, positions.reshape(-1), config)
        k_cache, v_cache = append(k_cache, index, k), append(v_cache, index, v)
        attention = _attend(q.reshape(B, S, *q.shape[1:]), k_cache[index], v_cache[index],
                            positions, config.head_dim ** -0.5)
        return (finish_layer(x, attention.reshape(B * S, -1), layer_params, config), k_cache,
                v_cache), None

    (x, k_cache, v_cache), _ = jax.lax.scan(
        layer_step, (x, cache.k, cache.v), (params.layers, jnp.arange(config.num_layers)))
    out = logits(params, x.reshape(B, S, -1), config)
    return out, DenseCache(k_cache, v_cache, cache.lengths + S)
