"""Argument checks shared by every implementation, run before anything is traced.

Shapes and dtypes are always checked. Values (lengths against the block-table width, query
offsets) are checked when they are concrete; under ``jit`` they are traced, and the kernels
then clamp what they read to the block table so that a bad value cannot read out of bounds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _shape(x) -> tuple[int, ...]:
    return tuple(np.shape(x))


def _concrete(x) -> np.ndarray | None:
    return None if isinstance(x, jax.core.Tracer) else np.asarray(x)


def _integer_vector(op: str, name: str, x, length: int | None = None) -> None:
    dtype = jnp.result_type(x)
    if len(_shape(x)) != 1 or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{op}: {name} must be a 1-D integer array, got {dtype}{list(_shape(x))}")
    if length is not None and _shape(x)[0] != length:
        raise ValueError(f"{op}: {name} has length {_shape(x)[0]}, expected {length}")


def check_pool(op: str, q, k_pages, v_pages, block_tables, num_seqs: int, layer) -> None:
    """q: [tokens, num_heads, head_dim]; pools: [num_kv_heads, num_blocks, block_size,
    head_dim], or that stacked over layers with ``layer`` naming one; block_tables:
    int[num_seqs, max_blocks_per_seq]."""
    if len(_shape(q)) != 3:
        raise ValueError(f"{op}: q must be [tokens, num_heads, head_dim], got shape {_shape(q)}")
    if len(_shape(k_pages)) not in (4, 5):
        raise ValueError(f"{op}: k_pages must be [num_kv_heads, num_blocks, block_size, "
                         f"head_dim] or stacked [layers, ...], got shape {_shape(k_pages)}")
    if _shape(v_pages) != _shape(k_pages):
        raise ValueError(f"{op}: v_pages has shape {_shape(v_pages)}, expected k_pages' "
                         f"{_shape(k_pages)}")
    stacked = len(_shape(k_pages)) == 5
    if stacked != (layer is not None):
        raise ValueError(f"{op}: layer={layer!r} with pools of shape {_shape(k_pages)}: pass "
                         "layer= exactly when the pools are stacked over layers")
    layer_value = _concrete(layer) if stacked else None
    if layer_value is not None and not 0 <= layer_value < _shape(k_pages)[0]:
        raise ValueError(f"{op}: layer={layer_value} is outside the {_shape(k_pages)[0]} "
                         "stacked layers")
    num_kv_heads, _, _, head_dim = _shape(k_pages)[-4:]
    if _shape(q)[2] != head_dim:
        raise ValueError(f"{op}: q has head_dim {_shape(q)[2]}, the pools {head_dim}")
    if _shape(q)[1] % num_kv_heads:
        raise ValueError(f"{op}: {_shape(q)[1]} query heads are not a multiple of "
                         f"{num_kv_heads} KV heads")
    dtypes = {name: jnp.result_type(x) for name, x in
              (("q", q), ("k_pages", k_pages), ("v_pages", v_pages))}
    if len(set(dtypes.values())) != 1 or dtypes["q"] not in FLOAT_DTYPES:
        raise ValueError(f"{op}: q, k_pages and v_pages must share one of float32, bfloat16, "
                         f"float16; got {', '.join(f'{n}={d}' for n, d in dtypes.items())}")
    table_dtype = jnp.result_type(block_tables)
    if len(_shape(block_tables)) != 2 or not jnp.issubdtype(table_dtype, jnp.integer):
        raise ValueError(f"{op}: block_tables must be a 2-D integer array, got "
                         f"{table_dtype}{list(_shape(block_tables))}")
    if _shape(block_tables)[0] != num_seqs:
        raise ValueError(f"{op}: block_tables has {_shape(block_tables)[0]} rows, expected "
                         f"{num_seqs} (one per sequence)")


def _check_fits_table(op: str, name: str, lengths, block_tables, block_size: int) -> None:
    values = _concrete(lengths)
    if values is None or not values.size:
        return
    capacity = _shape(block_tables)[1] * block_size
    if values.min() < 0 or values.max() > capacity:
        raise ValueError(f"{op}: {name} must lie in [0, {capacity}] (block table of "
                         f"{_shape(block_tables)[1]} blocks of {block_size}); got "
                         f"[{values.min()}, {values.max()}]")


def check_decode(q, k_pages, v_pages, block_tables, lengths, layer) -> None:
    op = "paged_decode_attention"
    check_pool(op, q, k_pages, v_pages, block_tables, _shape(q)[0] if _shape(q) else 0, layer)
    _integer_vector(op, "lengths", lengths, _shape(q)[0])
    _check_fits_table(op, "lengths", lengths, block_tables, _shape(k_pages)[-2])


def check_prefill(q, k_pages, v_pages, block_tables, context_lens, query_start_loc,
                  layer) -> None:
    op = "paged_prefill_attention"
    _integer_vector(op, "context_lens", context_lens)
    num_seqs = _shape(context_lens)[0]
    check_pool(op, q, k_pages, v_pages, block_tables, num_seqs, layer)
    _integer_vector(op, "query_start_loc", query_start_loc, num_seqs + 1)
    _check_fits_table(op, "context_lens", context_lens, block_tables, _shape(k_pages)[-2])
    starts, contexts = _concrete(query_start_loc), _concrete(context_lens)
    if starts is None or contexts is None:
        return
    query_lens = np.diff(starts)
    if starts[0] < 0 or (query_lens < 0).any() or starts[-1] > _shape(q)[0]:
        raise ValueError(f"{op}: query_start_loc must rise from >= 0 to <= {_shape(q)[0]} "
                         f"tokens, got {starts.tolist()}")
    if (query_lens > contexts).any():
        raise ValueError(f"{op}: a sequence has more query tokens than context (its context "
                         f"includes them): query lengths {query_lens.tolist()}, context_lens "
                         f"{contexts.tolist()}")
