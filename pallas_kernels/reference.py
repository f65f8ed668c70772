"""Pure-JAX references of the paged attention kernels, with the kernels' signatures.

Each query token gathers its sequence's pages and runs a dense masked softmax in float32.
Written for clarity, not speed: it is the ground truth of the kernel tests and the
implementation ``impl="auto"`` picks where no GPU kernel runs. Tokens are processed
``tokens_per_chunk`` at a time so that memory stays bounded for long prompts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

HIGHEST = lax.Precision.HIGHEST


def _attend_one(q, position, context_len, row, k_pages, v_pages, sm_scale):
    """Attention of one query token at ``position`` over its sequence's first
    ``context_len`` cached tokens (block-table ``row``), causally: keys at positions
    ``<= position``. Returns zeros when nothing is visible."""
    num_kv_heads, _, block_size, head_dim = k_pages.shape
    num_pages = row.shape[0]
    # Pages past the sequence are never read: they may belong to another sequence.
    row = jnp.where(jnp.arange(num_pages) * block_size < context_len, row, 0)
    k = k_pages[:, row].reshape(num_kv_heads, num_pages * block_size, head_dim)
    v = v_pages[:, row].reshape(num_kv_heads, num_pages * block_size, head_dim)
    visible = jnp.arange(num_pages * block_size) <= position  # position < context_len
    q = q.reshape(num_kv_heads, -1, head_dim).astype(jnp.float32)
    scores = jnp.einsum("hgd,hkd->hgk", q, k.astype(jnp.float32), precision=HIGHEST) * sm_scale
    scores = jnp.where(visible, scores, -jnp.inf)
    top = scores.max(axis=-1, keepdims=True)
    weights = jnp.exp(scores - jnp.where(jnp.isfinite(top), top, 0.0))
    total = weights.sum(axis=-1, keepdims=True)
    weights = weights / jnp.where(total > 0, total, 1.0)
    v = jnp.where(visible[:, None], v.astype(jnp.float32), 0.0)  # unread garbage may be NaN
    out = jnp.einsum("hgk,hkd->hgd", weights, v, precision=HIGHEST)
    return out.reshape(-1, head_dim)


@functools.partial(jax.jit, static_argnames=("sm_scale", "tokens_per_chunk"))
def paged_prefill_attention(q, k_pages, v_pages, block_tables, context_lens, query_start_loc,
                            layer, *, sm_scale: float, tokens_per_chunk: int = 64) -> jax.Array:
    """Ragged causal attention of a flat batch of query tokens over paged K/V.

    q: [T, num_heads, head_dim]; k_pages, v_pages: [layers, num_kv_heads, num_blocks,
    block_size, head_dim], of which ``layer`` (int32 scalar) is read; block_tables: int[S, max_blocks]; context_lens: int[S], each sequence's cached
    tokens *including* its query tokens (already written to the pool); query_start_loc:
    int[S + 1], sequence s owns tokens ``query_start_loc[s]:query_start_loc[s + 1]``, which are
    the last ones of its context. Tokens past ``query_start_loc[S]`` are padding (zeros out).
    """
    k_pages, v_pages = k_pages[layer], v_pages[layer]
    num_tokens = q.shape[0]
    num_seqs = context_lens.shape[0]
    token = jnp.arange(num_tokens)
    seq = jnp.searchsorted(query_start_loc[1:], token, side="right")
    in_batch = (token >= query_start_loc[0]) & (seq < num_seqs)
    seq = jnp.minimum(seq, num_seqs - 1)
    start, end = query_start_loc[seq], query_start_loc[seq + 1]
    position = jnp.where(in_batch, context_lens[seq] - (end - start) + token - start, -1)

    def attend(args):
        q_token, position_token, seq_token = args
        return _attend_one(q_token, position_token, context_lens[seq_token],
                           block_tables[seq_token], k_pages, v_pages, sm_scale)

    out = lax.map(attend, (q, position, seq), batch_size=tokens_per_chunk)
    return out.astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("sm_scale", "tokens_per_chunk"))
def paged_decode_attention(q, k_pages, v_pages, block_tables, lengths, layer, *,
                           sm_scale: float, tokens_per_chunk: int = 64) -> jax.Array:
    """One query token per sequence, the last of its ``lengths[b]`` cached tokens.

    q: [B, num_heads, head_dim]; block_tables: int[B, max_blocks]; lengths: int[B] (0: the
    output is zeros). Pools as in ``paged_prefill_attention``.
    """
    one_each = jnp.arange(q.shape[0] + 1, dtype=jnp.int32)
    return paged_prefill_attention(q, k_pages, v_pages, block_tables, lengths, one_each, layer,
                                   sm_scale=sm_scale, tokens_per_chunk=tokens_per_chunk)
