"""Content-addressed prefix caching over the block table (vLLM's automatic prefix caching).

A full block's K,V is named by a *key* (``KEY_WORDS`` uint32 words, not all zero) that chains
the block's content with the key of the block before it, from a root that names the request's
cache salt. The executor supplies keys — the engine hashes token ids cryptographically
(``engine.hashing``), the simulator uses workload ids — and the scheduler never sees tokens.

Keys are a fast index, not the proof of a hit. A hit is *verified*, so that neither a hash
collision nor a stale entry ever serves K,V computed for another prefix:

- each cached block keeps what the executor verifies against (``content``: the engine's token
  ids of the block; nothing, width 0, for the simulator's exact ids), and a hit's must equal the
  prompt's;
- each cached block gets a serial number when it is registered and keeps its *parent tag*: the
  serial of the cached block before it in its sequence, or for a first block the sequence's root
  tag (``root_tag(salt id)``). A prompt's block j is a hit only if its cached block's parent tag
  is the serial of the block matched for j - 1 (or the prompt's root tag), so a matched run is
  a chain of registrations of exactly the prompt's blocks under its salt.

The index is set-associative: ``num_sets`` sets of ``WAYS`` entries (at least four entries a
block), a key's set chosen from a mix of all its words. A key takes a free way of its set, else
the way of its set's least recently used block that nothing but the cache holds; two keys in
one set cost nothing while a way is free.

A cached block holds a reference of its own (``block_table.retain``), so it outlives the
request that computed it; a block held only by the cache is *evictable*, and when memory is
needed the least recently used evictable blocks go first (the later blocks of a sequence before
the earlier ones, whose keys the later ones need).

- ``match``: the longest run of a prompt's leading blocks that are verified hits.
- ``register``: a sequence's full blocks enter the cache after its verified run.
- ``evict``: the least recently used evictable blocks leave the cache.

The cache covers layer group 0: prefix caching needs a table with one layer group.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from symphony_jax.memory import block_table as bt

u32, i32, f32 = jnp.uint32, jnp.int32, jnp.float32
KEY_WORDS = 4  # uint32 words of a key
WAYS = 8  # entries of a set
WAYS_PER_BLOCK = 4  # index entries per pool block (at least)
ROOT = 1 << 31  # root tags are ROOT | salt id; serial numbers stay below it
NO_TAG = 0  # a parent tag no block has (serials start at 1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PrefixCache:
    """An index of H sets x WAYS entries over a pool of NB blocks (C: content width)."""

    keys: jax.Array  # u32[H, WAYS, K]  key of each entry (zeros: empty)
    blocks: jax.Array  # i32[H, WAYS]   block of each entry (NB: empty)
    block_keys: jax.Array  # u32[NB, K]  key each block is cached under (zeros: not cached)
    content: jax.Array  # i32[NB, C]    what a hit on each block is verified against
    serial: jax.Array  # u32[NB]        each cached block's registration number
    parent: jax.Array  # u32[NB]        its parent tag: the block before it's serial, or a root
    depth: jax.Array  # i32[NB]         its index in its sequence
    last_used: jax.Array  # f32[NB]     when it was registered or last matched
    next_serial: jax.Array  # u32[]

    @property
    def num_sets(self) -> int:
        return self.blocks.shape[0]

    @property
    def num_blocks(self) -> int:
        return self.block_keys.shape[0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Prefixes:
    """The blocks of N sequences as the cache names them (MB blocks each)."""

    keys: jax.Array  # u32[N, MB, K]  zeros past a sequence's full blocks
    content: jax.Array  # i32[N, MB, C]  what verifies each block (C = the cache's width)
    root: jax.Array  # u32[N]  each sequence's root tag


def root_tag(salt_id: int) -> int:
    """The parent tag of a first block whose sequence has salt number ``salt_id`` (0: none;
    below ``ROOT``)."""
    return ROOT | salt_id


def create(num_blocks: int, content_width: int = 0) -> PrefixCache:
    sets = 1 << max(0, (WAYS_PER_BLOCK * num_blocks // WAYS - 1).bit_length())
    return PrefixCache(
        keys=jnp.zeros((sets, WAYS, KEY_WORDS), u32), blocks=jnp.full((sets, WAYS), num_blocks, i32),
        block_keys=jnp.zeros((num_blocks, KEY_WORDS), u32),
        content=jnp.zeros((num_blocks, content_width), i32), serial=jnp.zeros(num_blocks, u32),
        parent=jnp.zeros(num_blocks, u32), depth=jnp.zeros(num_blocks, i32),
        last_used=jnp.zeros(num_blocks, f32), next_serial=jnp.ones((), u32))


def is_key(keys: jax.Array) -> jax.Array:
    return (keys != 0).any(axis=-1)


def _fmix(h: jax.Array) -> jax.Array:
    """MurmurHash3's finalizer: every input bit flips about half of the output bits."""
    h = (h ^ (h >> u32(16))) * u32(0x85EBCA6B)
    h = (h ^ (h >> u32(13))) * u32(0xC2B2AE35)
    return h ^ (h >> u32(16))


def set_of(keys: jax.Array, num_sets: int) -> jax.Array:
    """i32[...]: the set of each key (``u32[..., K]``), from a mix of all of its words (the
    simulator's keys are small integers, the engine's uniform hashes)."""
    h = jnp.full(keys.shape[:-1], 0x9E3779B9, u32)
    for w in range(keys.shape[-1]):
        h = _fmix(h ^ keys[..., w])
    return (h & u32(num_sets - 1)).astype(i32)


def evictable(cache: PrefixCache, table: bt.BlockTable) -> jax.Array:
    """bool[NB]: cached blocks nothing but the cache references."""
    return is_key(cache.block_keys) & (table.ref_counts == 1)


def lookup(cache: PrefixCache, keys: jax.Array) -> jax.Array:
    """The block cached under each key (``u32[..., K]``); NB where there is none. A key is
    found, not verified: see ``match``."""
    where = set_of(keys, cache.num_sets)
    same = (cache.keys[where] == keys[..., None, :]).all(axis=-1) & is_key(keys)[..., None]
    blocks = jnp.where(same, cache.blocks[where], cache.num_blocks)
    return blocks.min(axis=-1)


def _verified(cache: PrefixCache, prefixes: Prefixes, blocks: jax.Array) -> jax.Array:
    """bool[N, MB]: which of ``blocks`` (found for ``prefixes``' keys) hold what the prefixes
    name there: the same content, and the parent tag that chains them to the block found just
    before (the root tag for the first)."""
    NB = cache.num_blocks
    found = blocks < NB
    content = cache.content.at[blocks].get(mode="fill", fill_value=0)
    same = (content == prefixes.content).all(axis=-1)
    before = cache.serial.at[blocks[:, :-1]].get(mode="fill", fill_value=NO_TAG)
    expected = jnp.concatenate([prefixes.root[:, None].astype(u32), before], axis=1)
    linked = cache.parent.at[blocks].get(mode="fill", fill_value=NO_TAG) == expected
    return found & same & linked


def _run(hit: jax.Array) -> jax.Array:
    """i32[N]: the length of each row's leading run of hits (``hit: bool[N, MB]``)."""
    return jnp.cumprod(hit, axis=1).sum(axis=1, dtype=i32)


def match(cache: PrefixCache, prefixes: Prefixes, limit: jax.Array):
    """For N prompts: the cached blocks of each prompt's longest run of leading verified hits,
    at most ``limit[N]`` of them. Returns the blocks (``i32[N, MB]``, 0 past the run) and the
    run lengths (``i32[N]``)."""
    blocks = lookup(cache, prefixes.keys)
    MB = blocks.shape[1]
    hit = _verified(cache, prefixes, blocks) & (jnp.arange(MB) < limit[:, None])
    counts = _run(hit)
    return jnp.where(jnp.arange(MB) < counts[:, None], blocks, 0), counts


def touch(cache: PrefixCache, blocks: jax.Array, now) -> PrefixCache:
    """Mark ``blocks`` (any shape; 0: none) used at ``now`` (broadcast to their shape)."""
    NB = cache.num_blocks
    when = jnp.broadcast_to(jnp.asarray(now, f32), blocks.shape)
    return dataclasses.replace(cache, last_used=cache.last_used.at[
        jnp.where(blocks > 0, blocks, NB)].set(when, mode="drop"))


def _victim_way(cache: PrefixCache, table: bt.BlockTable, where: jax.Array):
    """For entries in sets ``where`` (i32[E]): the way each would take — a free one, else the
    way of the set's least recently used evictable block (deepest first) — and whether there is
    one."""
    NB = cache.num_blocks
    ways = cache.blocks[where]  # [E, WAYS]
    occupied = ways < NB
    free_to_take = ~occupied | (table.ref_counts.at[ways].get(mode="fill", fill_value=0) == 1)
    used = jnp.where(occupied, cache.last_used.at[ways].get(mode="fill", fill_value=0), -jnp.inf)
    used = jnp.where(free_to_take, used, jnp.inf)
    oldest = used.min(axis=1, keepdims=True)
    depth = jnp.where(occupied, cache.depth.at[ways].get(mode="fill", fill_value=0), -1)
    way = jnp.argmax(jnp.where(used == oldest, depth, -2), axis=1).astype(i32)
    return way, oldest[:, 0] < jnp.inf


def _drop(cache: PrefixCache, table: bt.BlockTable, blocks: jax.Array):
    """Take cached ``blocks`` (i32[E]; NB: none) out of the cache and release its references."""
    NB, H = cache.num_blocks, cache.num_sets
    safe = jnp.minimum(blocks, NB - 1)
    where = jnp.where(blocks < NB, set_of(cache.block_keys[safe], H), H)
    way = jnp.argmax(cache.blocks.at[where].get(mode="fill", fill_value=NB) == blocks[:, None],
                     axis=1)
    table = bt.release(table, jnp.where(blocks < NB, blocks, -1))
    return dataclasses.replace(
        cache, keys=cache.keys.at[where, way].set(0, mode="drop"),
        blocks=cache.blocks.at[where, way].set(NB, mode="drop"),
        block_keys=cache.block_keys.at[blocks].set(0, mode="drop")), table


def _advance(serial: jax.Array, count: jax.Array) -> jax.Array:
    """The serial number ``count`` after ``serial``: serials stay in [1, ROOT), wrapping."""
    return (serial - u32(1) + count) % u32(ROOT - 1) + u32(1)


def _serials(first: jax.Array, won: jax.Array) -> jax.Array:
    """u32[E]: serial numbers for the entries that ``won``, in order, from ``first``."""
    return _advance(first, jnp.cumsum(won, dtype=u32) - u32(1))


def register(cache: PrefixCache, table: bt.BlockTable, prefixes: Prefixes, blocks: jax.Array,
             valid: jax.Array, now) -> tuple[PrefixCache, bt.BlockTable]:
    """Cache the blocks of B sequences: ``blocks[b, j]`` (i32[B, MB]) holds ``prefixes``' block
    j of sequence b, ``valid[b, j]`` where it is full and referenced by its caller. Each
    sequence's blocks after its run of verified hits enter the cache in order, as far as they
    can: a block stops its sequence if its set has no way to give, or it is cached already.
    An entry under the same key that was there before is not a hit for this sequence (the run
    ends before it): it is stale, and gives way if nothing but the cache holds it. Two sequences
    registering one key: the first in batch order wins, the other links to its block."""
    B, MB = blocks.shape
    NB, H = cache.num_blocks, cache.num_sets
    E = B * MB
    keys, content = prefixes.keys.reshape(E, -1), prefixes.content.reshape(E, -1)
    flat = blocks.reshape(E)
    where = set_of(keys, H)
    position = jnp.arange(E, dtype=i32)
    after_run = jnp.arange(MB) >= _run(_verified(cache, prefixes, lookup(cache, prefixes.keys)))[
        :, None]
    already = is_key(cache.block_keys.at[flat].get(mode="fill", fill_value=0))
    pending = valid.reshape(E) & is_key(keys) & after_run.reshape(E) & ~already

    def one_round(carry):
        """Each set takes the first pending entry that maps to it and finds room there."""
        cache, table, pending, won_before, fresh = carry
        holder = lookup(cache, keys)
        registered = fresh.at[holder].get(mode="fill", fill_value=False)  # by this call
        stale = (holder < NB) & ~registered
        way, room = _victim_way(cache, table, where)
        stale_way = jnp.argmax(cache.blocks[where] == holder[:, None], axis=1).astype(i32)
        way = jnp.where(stale, stale_way, way)
        room = jnp.where(stale, table.ref_counts.at[holder].get(mode="fill", fill_value=0) == 1,
                         room & ~registered)
        can = pending & room
        first = jnp.full(H, E, i32).at[jnp.where(can, where, H)].min(position, mode="drop")
        won = can & (first[where] == position)
        cache, table = _drop(cache, table, jnp.where(won, cache.blocks[where, way], NB))
        table = bt.retain(table, jnp.where(won, flat, -1))
        target, entry = jnp.where(won, flat, NB), jnp.where(won, where, H)
        cache = dataclasses.replace(
            cache, keys=cache.keys.at[entry, way].set(keys, mode="drop"),
            blocks=cache.blocks.at[entry, way].set(flat, mode="drop"),
            block_keys=cache.block_keys.at[target].set(keys, mode="drop"),
            content=cache.content.at[target].set(content, mode="drop"),
            serial=cache.serial.at[target].set(_serials(cache.next_serial, won), mode="drop"),
            depth=cache.depth.at[target].set(position % MB, mode="drop"),
            last_used=cache.last_used.at[target].set(jnp.asarray(now, f32), mode="drop"),
            next_serial=_advance(cache.next_serial, won.sum(dtype=u32)))
        return (cache, table, pending & room & ~won, won_before | won,
                fresh.at[target].set(True, mode="drop"))

    cache, table, _, won, _ = jax.lax.while_loop(
        lambda carry: carry[2].any(), one_round,
        (cache, table, pending, jnp.zeros(E, bool), jnp.zeros(NB, bool)))
    # Parent tags of the new entries: the serial of the block cached under the key before.
    holders = lookup(cache, prefixes.keys)
    before = cache.serial.at[holders[:, :-1]].get(mode="fill", fill_value=NO_TAG)
    tags = jnp.concatenate([prefixes.root[:, None].astype(u32), before], axis=1).reshape(E)
    cache = dataclasses.replace(cache, parent=cache.parent.at[jnp.where(won, flat, NB)].set(
        tags, mode="drop"))
    # A new entry after a block that could not enter is unreachable: it leaves again.
    reachable = jnp.arange(MB) < _run(_verified(cache, prefixes, holders))[:, None]
    return _drop(cache, table, jnp.where(won & ~reachable.reshape(E), flat, NB))


def evict(cache: PrefixCache, table: bt.BlockTable,
          count: jax.Array) -> tuple[PrefixCache, bt.BlockTable]:
    """Evict the ``count`` least recently used evictable blocks (fewer if there are fewer); of
    blocks used at the same time, the deepest in their sequences first."""
    NB = cache.num_blocks
    candidate = evictable(cache, table)
    order = jnp.lexsort((-cache.depth, jnp.where(candidate, cache.last_used, jnp.inf)))
    rank = jnp.zeros(NB, i32).at[order].set(jnp.arange(NB, dtype=i32))
    chosen = candidate & (rank < count)
    return _drop(cache, table, jnp.where(chosen, jnp.arange(NB, dtype=i32), NB))
