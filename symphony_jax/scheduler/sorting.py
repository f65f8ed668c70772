"""Ordering slot vectors with single-operand int32 sorts.

XLA:CPU sorts a lone int32 vector an order of magnitude faster than a sort that carries a
payload or compares several operands (``jnp.argsort``, ``jnp.lexsort``): for 256 values, about
2.5 us against 27-80 us. The scheduler orders its slots every step, so it sorts int32 keys
alone, and recovers indices from keys built as ``rank * n + index``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

i32 = jnp.int32


def sortable(x: jax.Array) -> jax.Array:
    """int32 keys in the order of ``x`` (a float's bits, negative ones flipped, so that
    -inf < ... < -0.0 == 0.0 < ... < inf; NaN is not ordered)."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return x.astype(i32)
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), i32)
    bits = jnp.where(bits == jnp.int32(-2**31), 0, bits)  # -0.0 is 0.0
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def ranks(key: jax.Array) -> jax.Array:
    """i32[n]: how many values of the int32 vector ``key`` are smaller than each (equal values
    share a rank)."""
    return jnp.searchsorted(jnp.sort(key), key, side="left").astype(i32)


def lexsort(keys: tuple[jax.Array, ...]) -> jax.Array:
    """i32[n]: the indices that sort by ``keys[-1]``, then ``keys[-2]``, ..., then index — what
    ``jnp.lexsort(keys)`` returns. Keys are vectors of one length n <= 46340 (so that
    ``n * n`` fits an int32)."""
    n = keys[0].shape[0]
    if n * n >= 2**31:
        raise ValueError(f"sorting.lexsort: {n} values; at most 46340 (n * n must fit int32)")
    combined = None  # the rank by the keys taken so far (most significant first)
    for key in reversed(keys):
        rank = ranks(sortable(key))
        combined = rank if combined is None else ranks(combined * n + rank)
    return jnp.sort(combined * n + jnp.arange(n, dtype=i32)) % n
