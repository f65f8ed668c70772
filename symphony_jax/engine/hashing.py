"""Block keys of token sequences, for the prefix cache.

A block's key is its content hash chained with the key of the block before it, so equal keys
mean equal prefixes (up to hash collisions, 64 bits). Each of two uint32 lanes hashes a block's
tokens polynomially, ``content = sum_t (token_t + 1) * p^(bs - 1 - t)``, and chains
``key_j = key_{j-1} * m + content_j`` (mod 2^32). The chain is an affine recurrence, so one
associative scan over the blocks computes it in logarithmic depth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

u32 = jnp.uint32
# (token multiplier p, chain multiplier m) per lane: odd constants, so both are invertible.
LANES = ((0x01000193, 0x85EBCA6B), (0x9E3779B1, 0xC2B2AE35))


def _powers(base: int, count: int) -> np.ndarray:
    """u32[count]: base^(count - 1), ..., base^0 (mod 2^32)."""
    powers = np.ones(count, np.uint64)
    for i in range(count - 2, -1, -1):
        powers[i] = (powers[i + 1] * base) % 2**32
    return powers.astype(np.uint32)


def block_keys(tokens: jax.Array, lengths: jax.Array, block_size: int,
               num_blocks: int) -> jax.Array:
    """u32[N, num_blocks, 2]: the keys of the full blocks of each row of ``tokens: i32[N, L]``
    (its first ``lengths[N]`` tokens); zeros for blocks that are not full."""
    width = num_blocks * block_size
    tokens = jnp.pad(tokens, ((0, 0), (0, max(0, width - tokens.shape[1]))))[:, :width]
    blocks = tokens.reshape(tokens.shape[0], num_blocks, block_size).astype(u32) + u32(1)
    lanes = []
    for token_base, chain_base in LANES:
        content = (blocks * jnp.asarray(_powers(token_base, block_size))).sum(axis=-1,
                                                                              dtype=u32)
        scale = jnp.full_like(content, chain_base)
        combine = lambda x, y: (x[0] * y[0], x[1] * y[0] + y[1])
        lanes.append(jax.lax.associative_scan(combine, (scale, content), axis=1)[1])
    keys = jnp.stack(lanes, axis=-1)
    keys = keys.at[..., 1].set(jnp.where((keys == 0).all(-1), u32(1), keys[..., 1]))
    full = jnp.arange(num_blocks)[None, :] < (lengths // block_size)[:, None]
    return jnp.where(full[..., None], keys, u32(0))
