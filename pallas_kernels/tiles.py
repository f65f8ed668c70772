"""Pieces shared by the Pallas kernels, traced inside them.

A kernel program owns a tile of query rows of one KV head and walks that head's pages a
*compute block* (``pages_per_block`` pages) at a time, keeping an online softmax in float32
(base 2: the softmax scale is folded with log2(e) into one multiply of the logits).

Masking rules, so that no unmasked byte of a page the sequence does not own reaches the
output: block-table entries at or past the sequence's page count are replaced by the null
block 0 before they are read; logits of invisible keys become -inf; V rows of keys past the
context are zeroed before the PV product (the pool may hold NaN there, and 0 * NaN = NaN).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

LOG2E = math.log2(math.e)

State = tuple[jax.Array, jax.Array, jax.Array]  # running max [R], sum [R], output [R, D]


def next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def load_pages(tables_ref, k_ref, v_ref, layer, seq, head, first_page, num_pages: jax.Array,
               pages_per_block: int) -> tuple[jax.Array, jax.Array]:
    """K and V tiles ``[pages_per_block * block_size, head_dim]`` of the pages
    ``first_page, ...`` of sequence ``seq`` in ``layer`` of the stacked pools; pages at or past
    ``num_pages`` read block 0."""
    index = first_page + lax.broadcasted_iota(jnp.int32, (pages_per_block,), 0)
    pages = tables_ref[seq, pl.ds(first_page, pages_per_block)]
    pages = jnp.where(index < num_pages, pages, 0)
    *_, block_size, head_dim = k_ref.shape
    tokens = pages_per_block * block_size
    return (k_ref[layer, head, pages].reshape(tokens, head_dim),
            v_ref[layer, head, pages].reshape(tokens, head_dim))


def init_state(rows: int, head_dim: int) -> State:
    return (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, head_dim), jnp.float32))


def _dot(a, b) -> jax.Array:
    """a @ b accumulated in float32; float32 inputs multiply in full precision (GPUs would use
    TF32 by default, about 1e-3 off)."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jnp.dot(a, b, precision=precision, preferred_element_type=jnp.float32)


def update(state: State, q, k, v, visible, key_valid, scale_log2: float) -> State:
    """Fold one compute block into the online softmax.

    q: [R, D]; k, v: [K, D]; visible: bool[R, K] (row r sees key k); key_valid: bool[K]
    (keys inside the context); scale_log2 = sm_scale * log2(e).
    """
    m, l, acc = state
    s = _dot(q, k.T) * scale_log2
    s = jnp.where(visible, s, -jnp.inf)
    v = jnp.where(key_valid[:, None], v, jnp.zeros_like(v))
    m_next = jnp.maximum(m, s.max(axis=-1))
    # A row that has seen no key yet keeps m = -inf; shift by 0 there to avoid inf - inf.
    shift = jnp.where(m_next == -jnp.inf, 0.0, m_next)
    p = jnp.exp2(s - shift[:, None])
    alpha = jnp.exp2(m - shift)
    pv = _dot(p.astype(v.dtype), v)
    return m_next, alpha * l + p.sum(axis=-1), alpha[:, None] * acc + pv


def normalized(state: State) -> jax.Array:
    """The attention output of each row; zeros for rows that saw no key."""
    _, l, acc = state
    return acc / jnp.where(l > 0, l, 1.0)[:, None]
