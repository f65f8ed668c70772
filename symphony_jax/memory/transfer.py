"""Copying K,V blocks between a device's pool and its host memory, asynchronously.

A *chunk* is a run of consecutive table columns of one sequence slot, copied out of the pool,
one pair of arrays per layer group: ``k[i], v[i]: [P_g, KVH, n, BS, D]``, the layers of group
``g = first_group + i`` in order (the rows of its own blocks; ``kv_cache``). Keeping groups apart
lets a copy carry only the groups a device misses (SYMPHONY purges upper groups, and restores
or fills only those). The layer axis leads, so a group can be loaded layer by layer (a scan
over axis 0, ``llama.forward``'s ``loads``), and ``n`` is a power of two so that the copies
compile for few shapes (``split`` cuts a run of blocks into such pieces, so nothing is padded).

- ``offload`` gathers the blocks in one jitted function whose output lives in the device's
  ``pinned_host`` memory (no donation: the pool stays live) and returns at once; the chunk's
  arrays are ready when the copy is complete (``Transfer.is_ready``).
- ``to_device`` ``device_put``s chunks (or some of their groups, ``Chunk.groups``) back to
  device memory, also at once; ``scatter`` then writes one into the donated pool at the slot's
  blocks.

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
from jax.sharding import SingleDeviceSharding

from symphony_jax.memory.kv_cache import KVPool, group_spans

i32 = jnp.int32


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Blocks ``[first_block, first_block + num_blocks)`` of a sequence, in some memory: layer
    groups ``first_group...`` of them, one array each."""

    first_block: int
    k: tuple[jax.Array, ...]  # each [P_g, KVH, n, BS, D]
    v: tuple[jax.Array, ...]
    first_group: int = 0

    @property
    def num_blocks(self) -> int:
        """Table columns (each group's ``num_blocks`` pool blocks)."""
        return self.k[0].shape[2]

    @property
    def pool_blocks(self) -> int:
        """Pool blocks, one group's layers each."""
        return self.num_blocks * len(self.k)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*self.k, *self.v))

    def is_ready(self) -> bool:
        return all(a.is_ready() for a in (*self.k, *self.v))

    def groups(self, start: int, stop: int) -> Chunk:
        """The same blocks, layer groups ``[start, stop)`` only."""
        if not self.first_group <= start < stop <= self.first_group + len(self.k):
            raise ValueError(f"Chunk.groups({start}, {stop}): the chunk holds groups "
                             f"[{self.first_group}, {self.first_group + len(self.k)})")
        cut = slice(start - self.first_group, stop - self.first_group)
        return Chunk(self.first_block, self.k[cut], self.v[cut], start)


@dataclasses.dataclass(frozen=True)
class Transfer:
    """Chunks on their way to a memory; complete once every array is ready."""

    chunks: tuple[Chunk, ...]

    def is_ready(self) -> bool:
        return all(c.is_ready() for c in self.chunks)

    def wait(self) -> tuple[Chunk, ...]:
        jax.block_until_ready([(c.k, c.v) for c in self.chunks])
        return self.chunks

    def complete(self, copy_completion: str) -> bool:
        """Whether the copy counts as complete now, checked at a step boundary:
        ``"polled"``, once ready (as soon as possible; when depends on timing); ``"next_step"``,
        always, waiting for it (decisions then depend only on the run's inputs)."""
        if copy_completion == "next_step":
            self.wait()
            return True
        return self.is_ready()


COPY_COMPLETION = ("polled", "next_step")  # ``Transfer.complete``'s modes


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


def group_block_ids(block_ids: jax.Array, group: int, slot, first_block,
                    num_blocks: int) -> jax.Array:
    """i32[n]: the slot's blocks ``first_block...`` in ``group``'s table."""
    return jax.lax.dynamic_slice_in_dim(block_ids[group, slot], first_block, num_blocks)


@functools.cache
def _gather_to(sharding: SingleDeviceSharding):
    def gather(pool: KVPool, block_ids, slot, first_block, *, num_blocks, layer_groups):
        def take(pages):  # each group's layers, from the pool's first rows of its blocks
            # "clip": XLA:CPU's gather runs about 4x faster than with the default out-of-bounds
            # fill
            return tuple(jnp.take(pages[:size], group_block_ids(block_ids, g, slot, first_block,
                                                                num_blocks), axis=2, mode="clip")
                         for g, _, size in group_spans(layer_groups))

        return take(pool.k), take(pool.v)

    return jax.jit(gather, static_argnames=("num_blocks", "layer_groups"),
                   out_shardings=sharding)


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
    return Transfer(tuple(Chunk(c.first_block, *jax.device_put((c.k, c.v), sharding),
                                c.first_group) for c in chunks))


def write(pool: KVPool, chunk: Chunk, block_ids: jax.Array, slot: int) -> KVPool:
    """``scatter`` a device ``chunk`` into ``slot``'s blocks."""
    return scatter(pool, chunk.k, chunk.v, block_ids, jnp.int32(slot),
                   jnp.int32(chunk.first_block), first_group=chunk.first_group)


@functools.partial(jax.jit, donate_argnames="pool", static_argnames="first_group")
def scatter(pool: KVPool, k: tuple[jax.Array, ...], v: tuple[jax.Array, ...],
            block_ids: jax.Array, slot, first_block, *, first_group: int = 0) -> KVPool:
    """Write a device chunk's groups ``k[i], v[i]: [P_g, KVH, n, BS, D]`` (group
    ``g = first_group + i``) into ``slot``'s blocks of each group from column ``first_block``
    on (``block_ids``: the table's, after the blocks were reserved)."""
    def put(pages, new):
        for i, group_new in enumerate(new):
            ids = group_block_ids(block_ids, first_group + i, slot, first_block,
                                  group_new.shape[2])
            pages = jax.lax.platform_dependent(pages, ids, group_new, cpu=_put_by_slices,
                                               default=_put_by_scatter)
        return pages

    return KVPool(put(pool.k, k), put(pool.v, v))


def _put_by_scatter(pages: jax.Array, ids: jax.Array, new: jax.Array) -> jax.Array:
    """``pages: [P, KVH, NB, BS, D]`` with ``new: [P_g, KVH, n, BS, D]`` (one layer group's) at
    the first ``P_g`` rows of blocks ``ids: i32[n]``."""
    return pages.at[:new.shape[0], :, ids].set(new)


def _put_by_slices(pages: jax.Array, ids: jax.Array, new: jax.Array) -> jax.Array:
    """``_put_by_scatter`` as a loop of in-place block updates, one layer's block at a time:
    XLA:CPU runs it about 2.5x faster than the scatter (a GPU, many times slower)."""
    num_blocks = ids.shape[0]

    def put_block(i, pages):
        row, block = i // num_blocks, i % num_blocks
        piece = jax.lax.dynamic_slice(new, (row, 0, block, 0, 0),
                                      (1, new.shape[1], 1, *new.shape[3:]))
        return jax.lax.dynamic_update_slice(pages, piece, (row, 0, ids[block], 0, 0))

    return jax.lax.fori_loop(0, new.shape[0] * num_blocks, put_block, pages)
