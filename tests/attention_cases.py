"""Random paged-KV cases and a dense float64 attention, independent of ``pallas_kernels``.

A case lays sequences' tokens out in pages of a pool whose every other byte is NaN: pages no
sequence owns, the null block, and the tail of each sequence's last partial page. Block-table
entries past a sequence's pages point at arbitrary pages (other sequences', NaN ones), so an
implementation that reads anything it should not is caught.
"""

from __future__ import annotations

import dataclasses

import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class Case:
    k_pages: np.ndarray  # [KVH, NB, BS, D]
    v_pages: np.ndarray
    block_tables: np.ndarray  # int32[S, MB]
    lengths: np.ndarray  # int32[S] cached tokens per sequence
    keys: list[np.ndarray]  # per sequence: float64 [length, KVH, D]
    values: list[np.ndarray]


def make_case(rng: np.random.Generator, lengths, *, num_kv_heads: int, head_dim: int,
              block_size: int, max_blocks: int, dtype, share_first_pages: int = 0) -> Case:
    """Sequences of ``lengths`` tokens; sequences after the first share the first
    ``share_first_pages`` pages of the first (full pages only, as a fork leaves them)."""
    pages_needed = [-(-n // block_size) for n in lengths]
    shared = min([share_first_pages, lengths[0] // block_size]
                 + [n // block_size for n in lengths[1:]])
    num_blocks = 1 + sum(pages_needed) - shared * (len(lengths) - 1) + 2  # null + spare
    ids = rng.permutation(np.arange(1, num_blocks))
    shape = (num_kv_heads, num_blocks, block_size, head_dim)
    k_pages, v_pages = np.full(shape, np.nan, np.float32), np.full(shape, np.nan, np.float32)
    tables = rng.integers(0, num_blocks, (len(lengths), max_blocks)).astype(np.int32)
    next_id, keys, values = 0, [], []
    for s, (n, pages) in enumerate(zip(lengths, pages_needed)):
        for j in range(pages):
            if s > 0 and j < shared:
                tables[s, j] = tables[0, j]
                continue
            tables[s, j] = ids[next_id]
            next_id += 1
            filled = min(block_size, n - j * block_size)
            for pool in (k_pages, v_pages):
                pool[:, tables[s, j], :filled] = rng.normal(size=(num_kv_heads, filled, head_dim))
    # Round to the dtype first: the dense reference sees exactly what the kernels see.
    k_pages = np.asarray(jnp.asarray(k_pages, dtype).astype(jnp.float32), np.float64)
    v_pages = np.asarray(jnp.asarray(v_pages, dtype).astype(jnp.float32), np.float64)
    for s, n in enumerate(lengths):
        row = tables[s, : pages_needed[s]]
        keys.append(k_pages[:, row].transpose(1, 2, 0, 3).reshape(-1, num_kv_heads, head_dim)[:n])
        values.append(v_pages[:, row].transpose(1, 2, 0, 3).reshape(-1, num_kv_heads, head_dim)[:n])
    return Case(k_pages, v_pages, tables, np.asarray(lengths, np.int32), keys, values)


def dense_attention(q, keys, values, positions, sm_scale) -> np.ndarray:
    """float64 attention of queries q [n, H, D] at ``positions`` over contiguous keys/values
    [L, KVH, D]: query i sees keys 0..positions[i]; none visible gives zeros."""
    n, num_heads, head_dim = q.shape
    num_kv_heads = keys.shape[1]
    kv = np.repeat(np.arange(num_kv_heads), num_heads // num_kv_heads)  # head -> its KV head
    out = np.zeros((n, num_heads, head_dim))
    for i in range(n):
        visible = min(positions[i] + 1, len(keys))
        if visible <= 0:
            continue
        for h in range(num_heads):
            scores = keys[:visible, kv[h]] @ q[i, h] * sm_scale
            weights = np.exp(scores - scores.max())
            out[i, h] = weights @ values[:visible, kv[h]] / weights.sum()
    return out


TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 5e-3}
geometries = st.fixed_dictionaries(dict(
    num_kv_heads=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 2, 3, 4]),  # MHA, GQA, a group that is not a power of two
    head_dim=st.sampled_from([64, 128]),
    block_size=st.sampled_from([8, 16, 32]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]),
))
