"""Copying K,V blocks between a device's pool and its host memory, asynchronously.

A *chunk* is a run of consecutive table columns of one sequence slot, copied out of the pool:
``k, v: [L, KVH, n, BS, D]``, every layer's (each layer group's rows of its own blocks, in layer
order; ``kv_cache``). The layer axis leads, so a chunk can be loaded layer by layer (a
scan over axis 0, ``llama.forward``'s ``loads``), and ``n`` is a power of two so that the copies
compile for few shapes (``split`` cuts a run of blocks into such pieces, so nothing is padded).

- ``offload`` gathers the blocks in one jitted function whose output lives in the device's
  ``pinned_host`` memory (no donation: the pool stays live) and returns at once; the chunk's
  arrays are ready when the copy is complete (``Transfer.is_ready``).
- ``to_device`` ``device_put``s a chunk back to device memory, also at once; ``scatter`` then
  writes it into the donated pool at the slot's blocks.

Ordering: a device runs what is dispatched to it in order, and a donated pool is reused only
after the work reading it is done, so an offload dispatched before the step that overwrites its
blocks reads them first. The scheduler hands the blocks of an offloaded slot to others in the
step that offloads it; the executor dispatches the offload before that step.

Every call must come from the thread that owns the pool (the engine's).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from symphony_jax.memory.kv_cache import KVPool, group_spans, layer_rows

i32 = jnp.int32


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Blocks ``[first_block, first_block + num_blocks)`` of a sequence, in some memory."""

    first_block: int
    k: jax.Array  # [L, KVH, n, BS, D]
    v: jax.Array  # [L, KVH, n, BS, D]

    @property
    def num_blocks(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def is_ready(self) -> bool:
        return self.k.is_ready() and self.v.is_ready()


@dataclasses.dataclass(frozen=True)
class Transfer:
    """Chunks on their way to a memory; complete once every array is ready."""

    chunks: tuple[Chunk, ...]

    def is_ready(self) -> bool:
        return all(c.is_ready() for c in self.chunks)

    def wait(self) -> tuple[Chunk, ...]:
        jax.block_until_ready([(c.k, c.v) for c in self.chunks])
        return self.chunks


def split(first_block: int, num_blocks: int, largest: int) -> list[tuple[int, int]]:
    """``[first_block, first_block + num_blocks)`` as runs ``(first, n)`` of power-of-two
    lengths at most ``largest`` (itself a power of two), longest first."""
    if largest < 1 or largest & (largest - 1):
        raise ValueError(f"split: largest={largest} must be a power of two")
    runs = []
    while num_blocks > 0:
        n = min(1 << (num_blocks.bit_length() - 1), largest)
        runs.append((first_block, n))
        first_block, num_blocks = first_block + n, num_blocks - n
    return runs


def host_sharding(device) -> SingleDeviceSharding:
    return SingleDeviceSharding(device, memory_kind="pinned_host")


def device_sharding(device) -> SingleDeviceSharding:
    return SingleDeviceSharding(device, memory_kind="device")


def layer_block_ids(block_ids: jax.Array, slot, first_block, num_blocks: int,
                    layer_groups: tuple[int, ...]) -> jax.Array:
    """i32[L, n]: the slot's blocks ``first_block...`` in each layer's group table."""
    rows = block_ids[jnp.asarray(np.asarray(layer_groups, np.int32)), slot]  # [L, MB]
    return jax.lax.dynamic_slice_in_dim(rows, first_block, num_blocks, axis=1)


@functools.cache
def _gather_to(sharding: SingleDeviceSharding):
    def gather(pool: KVPool, block_ids, slot, first_block, *, num_blocks, layer_groups):
        def take(pages):  # each group's layers, from the pool's first rows of its blocks
            # "clip": XLA:CPU's gather runs about 4x faster than with the default out-of-bounds
            # fill
            return jnp.concatenate([jnp.take(
                pages[:size], jax.lax.dynamic_slice_in_dim(block_ids[g, slot], first_block,
                                                           num_blocks), axis=2, mode="clip")
                for g, _, size in group_spans(layer_groups)])

        return take(pool.k), take(pool.v)

    return jax.jit(gather, static_argnames=("num_blocks", "layer_groups"),
                   out_shardings=(sharding, sharding))


def offload(pool: KVPool, block_ids: jax.Array, slot: int, first_block: int, num_blocks: int,
            *, layer_groups: tuple[int, ...], largest: int) -> Transfer:
    """Copy ``num_blocks`` blocks of ``slot`` from column ``first_block`` on (block ids from
    ``block_ids: i32[G, S, MB]``, a block table's) to the pool device's pinned host memory."""
    if first_block < 0 or first_block + num_blocks > block_ids.shape[-1]:
        raise ValueError(f"offload: blocks [{first_block}, {first_block + num_blocks}) are "
                         f"outside a table row of {block_ids.shape[-1]} columns")
    gather = _gather_to(host_sharding(next(iter(pool.k.devices()))))
    chunks = []
    for first, n in split(first_block, num_blocks, largest):
        k, v = gather(pool, block_ids, jnp.int32(slot), jnp.int32(first), num_blocks=n,
                      layer_groups=layer_groups)
        chunks.append(Chunk(first, k, v))
    return Transfer(tuple(chunks))


def to_device(chunks: tuple[Chunk, ...], device) -> Transfer:
    """Start copying host ``chunks`` to ``device``'s memory."""
    sharding = device_sharding(device)
    return Transfer(tuple(Chunk(c.first_block, *jax.device_put((c.k, c.v), sharding))
                          for c in chunks))


@functools.partial(jax.jit, donate_argnames="pool", static_argnames="layer_groups")
def scatter(pool: KVPool, k: jax.Array, v: jax.Array, block_ids: jax.Array, slot, first_block,
            *, layer_groups: tuple[int, ...]) -> KVPool:
    """Write a device chunk ``k, v: [L, KVH, n, BS, D]`` into ``slot``'s blocks from column
    ``first_block`` on (``block_ids``: the table's, after the blocks were reserved)."""
    ids = layer_block_ids(block_ids, slot, first_block, k.shape[2], layer_groups)
    by_slices = functools.partial(_put_by_slices, rows=layer_rows(layer_groups))
    by_scatter = functools.partial(_put_by_scatter, spans=group_spans(layer_groups))
    put = lambda pages, new: jax.lax.platform_dependent(pages, ids, new, cpu=by_slices,
                                                        default=by_scatter)
    return KVPool(put(pool.k, k), put(pool.v, v))


def _put_by_scatter(pages: jax.Array, ids: jax.Array, new: jax.Array, *, spans) -> jax.Array:
    """``pages: [P, KVH, NB, BS, D]`` with ``new: [L, KVH, n, BS, D]`` at blocks ``ids: [L, n]``
    (each group's layers at the first rows of its blocks; ``spans``: ``group_spans``)."""
    for _, first, size in spans:
        pages = pages.at[:size, :, ids[first]].set(new[first:first + size])
    return pages


def _put_by_slices(pages: jax.Array, ids: jax.Array, new: jax.Array, *, rows) -> jax.Array:
    """``_put_by_scatter`` as a loop of in-place block updates, one layer's block at a time
    (``rows``: each layer's pool row): XLA:CPU runs it about 2.5x faster than the scatter (a
    GPU, many times slower)."""
    num_blocks = ids.shape[1]
    rows = jnp.asarray(np.asarray(rows, np.int32))

    def put_block(i, pages):
        layer, block = i // num_blocks, i % num_blocks
        piece = jax.lax.dynamic_slice(new, (layer, 0, block, 0, 0),
                                      (1, new.shape[1], 1, *new.shape[3:]))
        return jax.lax.dynamic_update_slice(pages, piece,
                                            (rows[layer], 0, ids[layer, block], 0, 0))

    return jax.lax.fori_loop(0, ids.size, put_block, pages)
