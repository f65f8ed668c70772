"""Content-addressed prefix caching over the block table (vLLM's automatic prefix caching).

A full block's K,V is named by a 64-bit *key* (two uint32 lanes, not both zero): a hash of its
tokens chained with the key of the block before it, so equal keys mean equal prefixes. The
executor supplies keys — the engine hashes token ids, the simulator uses workload ids — and the
scheduler never sees tokens.

The cache maps keys to blocks in a direct-mapped table of H buckets (a power of two, at least
twice the pool). A cached block holds a reference of its own (``block_table.retain``), so it
outlives the request that computed it; a block held only by the cache is *evictable*, and when
memory is needed the least recently used evictable blocks go first. A lookup compares the whole
key: two keys in one bucket cost a miss, never a wrong block.

- ``match``: the longest run of a prompt's leading blocks whose keys are cached.
- ``register``: blocks enter the cache; a bucket holding an evictable block is taken over (that
  block is evicted), one holding a block in use is left alone.
- ``evict``: the least recently used evictable blocks leave the cache.

The cache covers layer group 0: prefix caching needs a table with one layer group.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from symphony_jax.memory import block_table as bt

u32, i32, f32 = jnp.uint32, jnp.int32, jnp.float32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PrefixCache:
    """H buckets of a pool of NB blocks."""

    keys: jax.Array  # u32[H, 2]    key in each bucket (zeros: empty)
    blocks: jax.Array  # i32[H]     block in each bucket (NB: empty)
    block_keys: jax.Array  # u32[NB, 2]  key each block is cached under (zeros: not cached)
    last_used: jax.Array  # f32[NB]  when each cached block was registered or last matched

    @property
    def num_buckets(self) -> int:
        return self.blocks.shape[0]


def create(num_blocks: int) -> PrefixCache:
    buckets = 1 << (2 * num_blocks - 1).bit_length()
    return PrefixCache(jnp.zeros((buckets, 2), u32), jnp.full(buckets, num_blocks, i32),
                       jnp.zeros((num_blocks, 2), u32), jnp.zeros(num_blocks, f32))


def is_key(keys: jax.Array) -> jax.Array:
    return (keys != 0).any(axis=-1)


def _bucket(keys: jax.Array, num_buckets: int) -> jax.Array:
    mixed = keys[..., 0] ^ (keys[..., 1] * u32(0x9E3779B1))
    return (mixed & u32(num_buckets - 1)).astype(i32)


def evictable(cache: PrefixCache, table: bt.BlockTable) -> jax.Array:
    """bool[NB]: cached blocks nothing but the cache references."""
    return is_key(cache.block_keys) & (table.ref_counts == 1)


def lookup(cache: PrefixCache, keys: jax.Array) -> jax.Array:
    """The block cached under each key (``u32[..., 2]``); NB where there is none."""
    bucket = _bucket(keys, cache.num_buckets)
    hit = is_key(keys) & (cache.keys[bucket] == keys).all(axis=-1)
    return jnp.where(hit, cache.blocks[bucket], cache.block_keys.shape[0])


def match(cache: PrefixCache, keys: jax.Array, limit: jax.Array):
    """For prompts with block keys ``u32[N, MB, 2]``: the cached blocks of each prompt's
    longest cached run of leading blocks, at most ``limit[N]`` of them. Returns the blocks
    (``i32[N, MB]``, 0 past the run) and the run lengths (``i32[N]``)."""
    blocks = lookup(cache, keys)
    hit = (blocks < cache.block_keys.shape[0]) & (jnp.arange(keys.shape[1]) < limit[:, None])
    counts = jnp.cumprod(hit, axis=1).sum(axis=1, dtype=i32)
    return jnp.where(jnp.arange(keys.shape[1]) < counts[:, None], blocks, 0), counts


def touch(cache: PrefixCache, blocks: jax.Array, now) -> PrefixCache:
    """Mark ``blocks`` (any shape; 0: none) used at ``now`` (broadcast to their shape)."""
    NB = cache.block_keys.shape[0]
    when = jnp.broadcast_to(jnp.asarray(now, f32), blocks.shape)
    return dataclasses.replace(cache, last_used=cache.last_used.at[
        jnp.where(blocks > 0, blocks, NB)].set(when, mode="drop"))


def register(cache: PrefixCache, table: bt.BlockTable, keys: jax.Array, blocks: jax.Array,
             valid: jax.Array, now) -> tuple[PrefixCache, bt.BlockTable]:
    """Cache ``blocks[e]`` (i32[E]) under ``keys[e]`` (u32[E, 2]) where ``valid[e]`` (each a
    block referenced by its caller, full). Keys already cached and blocks already cached are
    skipped; two entries for one bucket: the first wins."""
    H, NB = cache.num_buckets, cache.block_keys.shape[0]
    E = blocks.shape[0]
    bucket = _bucket(keys, H)
    present = lookup(cache, keys) < NB
    safe = jnp.where(valid, blocks, 0)
    already = is_key(cache.block_keys[safe])
    current = cache.blocks[bucket]
    occupied = current < NB
    current_evictable = occupied & (table.ref_counts.at[current].get(mode="fill",
                                                                        fill_value=0) == 1)
    can = valid & is_key(keys) & ~present & ~already & (~occupied | current_evictable)
    first = jnp.full(H, E, i32).at[jnp.where(can, bucket, H)].min(jnp.arange(E, dtype=i32),
                                                                 mode="drop")
    won = can & (first[bucket] == jnp.arange(E))
    evicted = jnp.where(won & occupied, current, -1)
    table = bt.release(table, evicted)
    table = bt.retain(table, jnp.where(won, blocks, -1))
    block_keys = cache.block_keys.at[jnp.where(evicted >= 0, evicted, NB)].set(
        0, mode="drop")
    target = jnp.where(won, blocks, NB)
    return PrefixCache(
        keys=cache.keys.at[jnp.where(won, bucket, H)].set(keys, mode="drop"),
        blocks=cache.blocks.at[jnp.where(won, bucket, H)].set(blocks, mode="drop"),
        block_keys=block_keys.at[target].set(keys, mode="drop"),
        last_used=cache.last_used.at[target].set(jnp.asarray(now, f32), mode="drop"),
    ), table


def evict(cache: PrefixCache, table: bt.BlockTable,
          count: jax.Array) -> tuple[PrefixCache, bt.BlockTable]:
    """Evict the ``count`` least recently used evictable blocks (fewer if there are fewer)."""
    H, NB = cache.num_buckets, cache.block_keys.shape[0]
    candidate = evictable(cache, table)
    order = jnp.argsort(jnp.where(candidate, cache.last_used, jnp.inf))
    rank = jnp.zeros(NB, i32).at[order].set(jnp.arange(NB, dtype=i32))
    chosen = candidate & (rank < count)
    table = bt.release(table, jnp.where(chosen, jnp.arange(NB, dtype=i32), -1))
    bucket = jnp.where(chosen, _bucket(cache.block_keys, H), H)
    return dataclasses.replace(
        cache, keys=cache.keys.at[bucket].set(0, mode="drop"),
        blocks=cache.blocks.at[bucket].set(NB, mode="drop"),
        block_keys=cache.block_keys.at[jnp.where(chosen, jnp.arange(NB), NB)].set(
            0, mode="drop")), table
