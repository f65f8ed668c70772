"""Paged decode attention (one query token per sequence) as a Pallas kernel, split-K.

Grid ``(batch, kv_heads, splits)``: each program attends one sequence's query heads of one KV
head (grouped-query: ``num_heads / num_kv_heads`` rows, padded to at least 16 for the Triton
dot) over one contiguous range of its pages, and writes a partial result with its softmax
max and sum. The partials are merged in plain JAX (flash-decoding): with M the largest max,
``out = sum_s 2^(m_s - M) l_s o_s / sum_s 2^(m_s - M) l_s``, splits without keys weighing 0.
One split per program suffices at large batch; small batches with long contexts need splits
to fill the GPU.

On GPU the kernel is lowered through Triton with explicit compiler parameters (without them
``pallas_call`` picks a different, deprecated backend in JAX 0.9-0.10). JAX 0.11 deprecates
the Pallas Triton backend itself; a Mosaic GPU (``plgpu.kernel``) port is the way forward once
it is removed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from pallas_kernels import tiles


def _kernel(layer_ref, lengths_ref, tables_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *,
            scale_log2: float, pages_per_block: int, pages_per_split: int):
    seq, head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    block_size = k_ref.shape[-2]
    length = lengths_ref[seq]
    num_pages = jnp.minimum(pl.cdiv(length, block_size), tables_ref.shape[1])
    first_page = split * pages_per_split
    pages_here = jnp.clip(num_pages - first_page, 0, pages_per_split)
    q = q_ref[...]
    rows, head_dim = q.shape

    def attend_block(j, state):
        start = first_page + j * pages_per_block
        k, v = tiles.load_pages(tables_ref, k_ref, v_ref, layer_ref[0], seq, head, start,
                                num_pages, pages_per_block)
        position = start * block_size + lax.broadcasted_iota(jnp.int32, (k.shape[0],), 0)
        valid = position < length
        return tiles.update(state, q, k, v, valid[None, :], valid, scale_log2)

    state = lax.fori_loop(0, pl.cdiv(pages_here, pages_per_block), attend_block,
                          tiles.init_state(rows, head_dim))
    o_ref[...] = tiles.normalized(state)
    m_ref[...] = state[0]
    l_ref[...] = state[1]


def default_splits(batch: int, num_kv_heads: int, num_compute_blocks: int) -> int:
    """Enough programs for two waves on a ~132-SM GPU, never more splits than blocks."""
    return max(1, min(num_compute_blocks, pl.cdiv(264, batch * num_kv_heads)))


@functools.partial(jax.jit, static_argnames=(
    "sm_scale", "num_splits", "pages_per_block", "num_warps", "num_stages", "interpret"))
def paged_decode_attention(q, k_pages, v_pages, block_tables, lengths, layer, *,
                           sm_scale: float, num_splits: int | None = None,
                           pages_per_block: int | None = None, num_warps: int = 4,
                           num_stages: int = 2, interpret: bool = False) -> jax.Array:
    """q: [B, num_heads, head_dim]; pools: [layers, num_kv_heads, num_blocks, block_size,
    head_dim], of which ``layer`` (int32 scalar) is read; block_tables: int[B, max_blocks];
    lengths: int[B]. Returns [B, num_heads, head_dim]."""
    batch, num_heads, head_dim = q.shape
    _, num_kv_heads, _, block_size, _ = k_pages.shape
    group = num_heads // num_kv_heads
    rows = max(16, tiles.next_power_of_two(group))
    pages_per_block = pages_per_block or max(1, 64 // block_size)
    num_blocks = pl.cdiv(block_tables.shape[1], pages_per_block)
    num_splits = num_splits or default_splits(batch, num_kv_heads, num_blocks)
    pages_per_split = pl.cdiv(num_blocks, num_splits) * pages_per_block
    width = num_splits * pages_per_split
    tables = jnp.pad(block_tables.astype(jnp.int32),
                     ((0, 0), (0, width - block_tables.shape[1])))
    q_rows = jnp.pad(q.reshape(batch, num_kv_heads, group, head_dim),
                     ((0, 0), (0, 0), (0, rows - group), (0, 0)))
    kernel = functools.partial(_kernel, scale_log2=sm_scale * tiles.LOG2E,
                               pages_per_block=pages_per_block, pages_per_split=pages_per_split)
    any_space = pl.BlockSpec(memory_space=pl.ANY)
    partial_shape = (batch, num_kv_heads, num_splits, rows)
    out, m, l = pl.pallas_call(
        kernel,
        grid=(batch, num_kv_heads, num_splits),
        in_specs=[any_space, any_space, any_space,
                  pl.BlockSpec((None, None, rows, head_dim), lambda b, h, s: (b, h, 0, 0)),
                  any_space, any_space],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, head_dim), lambda b, h, s: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct((*partial_shape, head_dim), jnp.float32),
                   jax.ShapeDtypeStruct(partial_shape, jnp.float32),
                   jax.ShapeDtypeStruct(partial_shape, jnp.float32)],
        interpret=interpret,
        compiler_params=pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name="paged_decode_attention",
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), lengths.astype(jnp.int32), tables, q_rows,
      k_pages, v_pages)
    top = m.max(axis=2, keepdims=True)
    weight = jnp.where(l > 0, jnp.exp2(m - jnp.where(jnp.isfinite(top), top, 0.0)) * l, 0.0)
    total = weight.sum(axis=2)
    merged = (weight[..., None] * out).sum(axis=2) / jnp.where(total > 0, total, 1.0)[..., None]
    return merged[:, :, :group].reshape(batch, num_heads, head_dim).astype(q.dtype)
