"""The paged KV pool of one node: K and V pages of every layer group, in the kernels' layout.

``k, v: [P, num_kv_heads, num_blocks, block_size, head_dim]`` — the layout fixed by
``pallas_kernels`` (head-major pages), stacked over the P layers of a layer group
(``CacheConfig.pool_layers``). A block belongs to one layer group at a time: layer l keeps its
K,V at row ``layer_rows(layer_groups)[l]`` of the blocks in its group's block-table row. Token
``i`` of a sequence is at flat slot ``block * block_size + i % block_size`` of its block
(``block_table.slot_mapping``). Block 0, the null block, is never written by a valid slot
mapping and its contents are never used unmasked.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from symphony_jax.config import CacheConfig, ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVPool:
    k: jax.Array  # [P, KVH, NB, BS, D]
    v: jax.Array  # [P, KVH, NB, BS, D]

    @property
    def num_blocks(self) -> int:
        return self.k.shape[2]

    @property
    def block_size(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def create(model: ModelConfig, cache: CacheConfig, dtype=None, device=None) -> KVPool:
    """A zeroed pool of ``cache.num_device_blocks`` blocks on ``device`` (default: JAX's)."""
    shape = (cache.pool_layers(model.num_layers), model.num_kv_heads, cache.num_device_blocks,
             cache.block_size, model.head_dim)
    dtype = jnp.dtype(dtype or model.dtype)
    return KVPool(jnp.zeros(shape, dtype, device=device), jnp.zeros(shape, dtype, device=device))


def group_spans(layer_groups: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """``(group, first layer, number of layers)`` of each (contiguous) layer group, in order."""
    return [(g, layer_groups.index(g), layer_groups.count(g)) for g in sorted(set(layer_groups))]


def layer_rows(layer_groups: tuple[int, ...]) -> tuple[int, ...]:
    """Each layer's row of the pool: its place in its layer group."""
    return tuple(row for _, _, size in group_spans(layer_groups) for row in range(size))


def at_least_two(index: jax.Array, values: jax.Array, dropped: int):
    """Pad a scatter of one update with a second one at the out-of-range ``dropped`` index.

    XLA rewrites a one-update scatter into a dynamic-update-slice, and inside a loop that also
    reads the array (a layer scan writing K/V and attending) that makes it copy the whole array
    on every iteration; with two updates it stays a scatter, done in place.
    """
    if index.shape[0] != 1:
        return index, values
    return (jnp.concatenate([index, jnp.full_like(index, dropped)]),
            jnp.concatenate([values, values]))


def write(pages: jax.Array, row, new: jax.Array, slot_mapping: jax.Array) -> jax.Array:
    """Store ``new: [T, KVH, D]`` (one layer's K or V of T tokens) at their flat slots of pool
    row ``row``.

    Slots at or past ``num_blocks * block_size`` (padding tokens) are dropped. Meant to run on a
    donated pool (or a loop carry) so that the scatter updates it in place.
    """
    P, KVH, NB, BS, D = pages.shape
    slot_mapping, new = at_least_two(slot_mapping, new, NB * BS)
    flat = pages.reshape(P, KVH, NB * BS, D)
    return flat.at[row, :, slot_mapping].set(new.astype(pages.dtype), mode="drop").reshape(
        pages.shape)


def write_blocks(pages: jax.Array, row, blocks: jax.Array, block_ids: jax.Array) -> jax.Array:
    """Store whole blocks ``blocks: [KVH, n, BS, D]`` of one layer at pool row ``row`` of
    ``block_ids: i32[n]`` (ids out of range are dropped)."""
    return pages.at[row, :, block_ids].set(jnp.swapaxes(blocks, 0, 1).astype(pages.dtype),
                                             mode="drop")


@functools.partial(jax.jit, donate_argnums=0)
def copy_blocks(pool: KVPool, src: jax.Array, dst: jax.Array) -> KVPool:
    """Copy blocks ``src[b] -> dst[b]`` in every pool row (a fork's copy-on-write pairs);
    ``dst`` entries out of range are skipped."""
    copy = lambda pages: pages.at[:, :, dst].set(pages[:, :, src], mode="drop")
    return KVPool(copy(pool.k), copy(pool.v))
