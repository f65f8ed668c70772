"""Ragged paged prefill attention as a Pallas kernel.

The batch is a flat run of query tokens from several sequences (whole prompts, prefill chunks
at any context offset, single decode tokens). Each sequence's tokens are cut into query
blocks of ``block_q`` tokens; a query block never spans two sequences. Grid
``(query blocks, kv_heads)``: a program attends the ``block_q x group`` query rows of its
block (all query heads of one KV head, grouped-query) causally over its sequence's pages, up
to the last key its last token may see.

The number of query blocks depends on the query lengths, which are traced; the grid uses its
bound ``cdiv(T, block_q) + S`` and the surplus programs do nothing. Each block writes its own
output tile (no two programs write the same memory); the tiles are gathered back to token order
in plain JAX.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from pallas_kernels import tiles


def _kernel(layer_ref, block_seq_ref, block_first_ref, block_count_ref, contexts_ref,
            starts_ref, tables_ref, q_ref, k_ref, v_ref, o_ref, *, scale_log2: float,
            group_rows: int, block_q: int, pages_per_block: int):
    block, head = pl.program_id(0), pl.program_id(1)
    block_size = k_ref.shape[-2]
    seq, first, count = block_seq_ref[block], block_first_ref[block], block_count_ref[block]
    context, start = contexts_ref[seq], starts_ref[seq]
    first_position = context - (starts_ref[seq + 1] - start) + first - start
    rows = block_q * group_rows
    row_token = lax.broadcasted_iota(jnp.int32, (rows,), 0) // group_rows
    row_position = jnp.where(row_token < count, first_position + row_token, -1)
    # Keys the block's last token may see; nothing for an empty (surplus) block.
    key_end = jnp.where(count > 0, jnp.clip(first_position + count, 0, context), 0)
    num_pages = jnp.minimum(pl.cdiv(key_end, block_size), tables_ref.shape[1])
    q = q_ref[head, pl.ds(first * group_rows, rows)]

    def attend_block(j, state):
        page = j * pages_per_block
        k, v = tiles.load_pages(tables_ref, k_ref, v_ref, layer_ref[0], seq, head, page,
                                num_pages, pages_per_block)
        key_position = page * block_size + lax.broadcasted_iota(jnp.int32, (k.shape[0],), 0)
        visible = key_position[None, :] <= row_position[:, None]
        return tiles.update(state, q, k, v, visible, key_position < key_end, scale_log2)

    state = lax.fori_loop(0, pl.cdiv(num_pages, pages_per_block), attend_block,
                          tiles.init_state(rows, q.shape[-1]))
    o_ref[...] = tiles.normalized(state).astype(o_ref.dtype)


def query_blocks(query_start_loc: jax.Array, num_tokens: int, block_q: int):
    """Cut each sequence's query tokens into blocks of at most ``block_q``.

    Returns, for each of the ``cdiv(num_tokens, block_q) + S`` possible blocks, its sequence,
    its first token and its token count (0 for surplus blocks), and for each token its block
    and row in it (block ``num_blocks`` for tokens past the batch).
    """
    num_seqs = query_start_loc.shape[0] - 1
    num_blocks = pl.cdiv(num_tokens, block_q) + num_seqs
    starts, ends = query_start_loc[:-1], query_start_loc[1:]
    per_seq = pl.cdiv(ends - starts, block_q)
    first_block = jnp.cumsum(per_seq) - per_seq
    block = jnp.arange(num_blocks, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(first_block + per_seq, block, side="right"), num_seqs - 1)
    first = starts[seq] + (block - first_block[seq]) * block_q
    count = jnp.where(block < per_seq.sum(), jnp.clip(ends[seq] - first, 0, block_q), 0)

    token = jnp.arange(num_tokens, dtype=jnp.int32)
    token_seq = jnp.minimum(jnp.searchsorted(ends, token, side="right"), num_seqs - 1)
    offset = token - starts[token_seq]
    in_batch = (token >= query_start_loc[0]) & (token < query_start_loc[-1])
    token_block = jnp.where(in_batch, first_block[token_seq] + offset // block_q, num_blocks)
    return (seq.astype(jnp.int32), jnp.where(count > 0, first, 0).astype(jnp.int32),
            count.astype(jnp.int32), token_block, offset % block_q)


@functools.partial(jax.jit, static_argnames=(
    "sm_scale", "rows_per_block", "pages_per_block", "num_warps", "num_stages", "interpret"))
def paged_prefill_attention(q, k_pages, v_pages, block_tables, context_lens, query_start_loc,
                            layer, *, sm_scale: float, rows_per_block: int = 64,
                            pages_per_block: int | None = None, num_warps: int = 4,
                            num_stages: int = 2, interpret: bool = False) -> jax.Array:
    """q: [T, num_heads, head_dim]; pools: [layers, num_kv_heads, num_blocks, block_size,
    head_dim], of which ``layer`` (int32 scalar) is read; block_tables: int[S, max_blocks];
    context_lens: int[S] (including the query tokens); query_start_loc: int[S + 1].
    Returns [T, num_heads, head_dim]."""
    num_tokens, num_heads, head_dim = q.shape
    _, num_kv_heads, _, block_size, _ = k_pages.shape
    group = num_heads // num_kv_heads
    group_rows = tiles.next_power_of_two(group)
    block_q = max(1, rows_per_block // group_rows)
    pages_per_block = pages_per_block or max(1, 64 // block_size)
    width = pl.cdiv(block_tables.shape[1], pages_per_block) * pages_per_block
    tables = jnp.pad(block_tables.astype(jnp.int32), ((0, 0), (0, width - block_tables.shape[1])))
    starts = query_start_loc.astype(jnp.int32)
    block_seq, block_first, block_count, token_block, token_row = query_blocks(
        starts, num_tokens, block_q)
    num_blocks = block_seq.shape[0]
    # [kv_heads, (T + block_q) * group_rows, head_dim]: a block's rows are contiguous, and the
    # last block may read past the batch into padding.
    q_rows = jnp.pad(q.reshape(num_tokens, num_kv_heads, group, head_dim),
                     ((0, block_q), (0, 0), (0, group_rows - group), (0, 0)))
    q_rows = q_rows.transpose(1, 0, 2, 3).reshape(num_kv_heads, -1, head_dim)
    kernel = functools.partial(_kernel, scale_log2=sm_scale * tiles.LOG2E,
                               group_rows=group_rows, block_q=block_q,
                               pages_per_block=pages_per_block)
    any_space = pl.BlockSpec(memory_space=pl.ANY)
    rows = block_q * group_rows
    out = pl.pallas_call(
        kernel,
        grid=(num_blocks, num_kv_heads),
        in_specs=[any_space] * 10,
        out_specs=pl.BlockSpec((None, None, rows, head_dim), lambda i, h: (i, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((num_blocks, num_kv_heads, rows, head_dim), q.dtype),
        interpret=interpret,
        compiler_params=pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name="paged_prefill_attention",
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), block_seq, block_first, block_count,
      context_lens.astype(jnp.int32), starts, tables, q_rows, k_pages, v_pages)
    out = out.reshape(num_blocks, num_kv_heads, block_q, group_rows, head_dim)
    out = out.at[token_block, :, token_row].get(mode="fill", fill_value=0)
    return out[:, :, :group].reshape(num_tokens, num_heads, head_dim)
