"""A Llama-family decoder over the paged KV pool.

``forward`` runs one step of a ragged batch — prompts, prefill chunks at any offset and decode
tokens mixed — laid out by ``memory.layout.BatchLayout``. Each layer writes its new K and V into
the pool through the slot mapping and attends through ``pallas_kernels`` over the pages of each
sequence. Layers run in one ``lax.scan`` over the stacked parameters (one per layer group in a
step that loads blocks from host memory), carrying the stacked pools (updated in place when the
pool is donated), so compile time does not grow with depth; each layer reads its layer group's
block tables and slot mapping.

The blocks (norms, projections, rotary embedding, MLP) follow Hugging Face's ``LlamaForCausalLM``
operation for operation, including where it casts, so that logits match it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from symphony_jax.config import ModelConfig
from symphony_jax.memory import kv_cache
from symphony_jax.memory.kv_cache import KVPool
from symphony_jax.memory.layout import BatchLayout
from symphony_jax.model import rope
from symphony_jax.model.params import LayerParams, LlamaParams


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockLoads:
    """Blocks of one layer group in host memory that a step copies into the pool layer by layer
    (layer-wise loading): ``k, v: [P_g, KVH, N, BS, D]``, block i going to ``block_ids[i]`` of
    the group (an id past the pool's blocks: padding, dropped)."""

    k: jax.Array
    v: jax.Array
    block_ids: jax.Array  # i32[N]


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Normalise in float32, cast back, then scale (Hugging Face's order)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def project_qkv(x: jax.Array, layer: LayerParams, positions: jax.Array, config: ModelConfig):
    """Query, key and value of tokens ``x: [T, H]`` at ``positions``, rotated:
    ``[T, heads, D]``, ``[T, kv_heads, D]``, ``[T, kv_heads, D]``."""
    h = rms_norm(x, layer.attn_norm, config.rms_norm_eps)
    T, D = x.shape[0], config.head_dim
    inv_freq = rope.inverse_frequencies(config)
    q = rope.rotate((h @ layer.wq).reshape(T, config.num_heads, D), positions, inv_freq)
    k = rope.rotate((h @ layer.wk).reshape(T, config.num_kv_heads, D), positions, inv_freq)
    return q, k, (h @ layer.wv).reshape(T, config.num_kv_heads, D)


def finish_layer(x: jax.Array, attention: jax.Array, layer: LayerParams,
                 config: ModelConfig) -> jax.Array:
    """Output projection and residual, then the SwiGLU MLP and residual."""
    x = x + attention.reshape(x.shape[0], -1).astype(x.dtype) @ layer.wo
    h = rms_norm(x, layer.mlp_norm, config.rms_norm_eps)
    return x + (jax.nn.silu(h @ layer.w_gate) * (h @ layer.w_up)) @ layer.w_down


def logits(params: LlamaParams, x: jax.Array, config: ModelConfig) -> jax.Array:
    """Float32 logits of hidden states ``x: [..., H]``."""
    x = rms_norm(x, params.final_norm, config.rms_norm_eps)
    head = params.embed.T if params.lm_head is None else params.lm_head
    return jnp.dot(x, head, preferred_element_type=jnp.float32)


@functools.partial(jax.jit, donate_argnames="pool", static_argnames=(
    "config", "layer_groups", "decode", "all_logits", "impl"))
def forward(params: LlamaParams, pool: KVPool, token_ids: jax.Array, layout: BatchLayout, *,
            config: ModelConfig, layer_groups: tuple[int, ...], decode: bool = False,
            all_logits: bool = False, impl: str = "auto",
            loads: tuple[BlockLoads | None, ...] | None = None) -> tuple[jax.Array, KVPool]:
    """One step: token ids ``i32[T]`` laid out by ``layout``; returns float32 logits of each
    sequence's last token ``[B, V]`` (every token's ``[T, V]`` with ``all_logits``) and the
    pool with the step's K and V written. The pool is donated.

    ``layer_groups[l]`` is layer l's group (``EngineConfig.layer_groups``). ``decode`` says that
    every sequence runs exactly one token at position ``context_len - 1`` and T == B (then the
    split-K decode kernel runs); otherwise the ragged prefill kernel does.

    ``loads`` (host-memory blocks of each layer group, or None, e.g. a session's K,V restored
    as it runs) are copied to the device inside the layer loop, each layer's before that layer
    writes and attends, so that the copy of layer l + 1 can overlap the compute of layer l.
    The loop then runs one scan per layer group, each with its group's loads.
    """
    if len(layer_groups) != config.num_layers:
        raise ValueError(f"forward: {len(layer_groups)} layer groups for {config.num_layers} "
                         "layers")
    groups = jnp.asarray(np.asarray(layer_groups, np.int32))
    rows = jnp.asarray(np.asarray(kv_cache.layer_rows(layer_groups), np.int32))
    scale = config.head_dim ** -0.5

    def load(pages, row, blocks, block_ids):
        return kv_cache.write_blocks(pages, row, jax.device_put(blocks, jax.memory.Space.Device),
                                     block_ids)

    def layer_step(carry, xs, load_ids=None):
        x, k_pages, v_pages = carry
        index, loaded_k, loaded_v = xs
        layer_params = jax.tree.map(lambda a: a[index], params.layers)
        row = rows[index]
        if load_ids is not None:
            k_pages = load(k_pages, row, loaded_k, load_ids)
            v_pages = load(v_pages, row, loaded_v, load_ids)
        q, k, v = project_qkv(x, layer_params, layout.positions, config)
        group = groups[index]
        slots = layout.slot_mapping[group]
        k_pages = kv_cache.write(k_pages, row, k, slots)
        v_pages = kv_cache.write(v_pages, row, v, slots)
        tables = layout.block_tables[group]
        if decode:
            attention = pk.paged_decode_attention(q, k_pages, v_pages, tables,
                                                  layout.context_lens, sm_scale=scale,
                                                  layer=row, impl=impl)
        else:
            attention = pk.paged_prefill_attention(q, k_pages, v_pages, tables,
                                                   layout.context_lens, layout.query_start_loc,
                                                   sm_scale=scale, layer=row, impl=impl)
        return (finish_layer(x, attention, layer_params, config), k_pages, v_pages), None

    spans = ([(0, config.num_layers, None)] if loads is None else
             [(first, size, loads[g]) for g, first, size in kv_cache.group_spans(layer_groups)])
    carry = (params.embed[token_ids], pool.k, pool.v)
    for first, size, span_loads in spans:
        indices = jnp.arange(first, first + size)
        if span_loads is None:
            carry, _ = jax.lax.scan(layer_step, carry, (indices, None, None))
        else:
            carry, _ = jax.lax.scan(functools.partial(layer_step, load_ids=span_loads.block_ids),
                                    carry, (indices, span_loads.k, span_loads.v))
    x, k_pages, v_pages = carry
    selected = x if all_logits else x[layout.logits_indices]
    return logits(params, selected, config), KVPool(k_pages, v_pages)
