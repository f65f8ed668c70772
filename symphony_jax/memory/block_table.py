"""The paged-KV block table: a pure-JAX allocator over fixed-shape arrays.

A KV pool holds ``num_blocks`` blocks of ``block_size`` token slots. Each sequence slot owns a
row of block ids (its table columns, in token order) and a token count; each block carries a
reference count, and free blocks sit on a stack. Every operation is a pure function of the
table, jitted, with the table donated: callers must use the returned table and drop the old.

Contracts
- Block 0 is the null block: never allocated, never freed, reference count 0. Unused table
  entries hold 0, so anything that reads a table row reads the null block where a sequence has
  no data (kernels mask by length; the null block's contents are never meaningful).
- Indices that must not take effect (padding, invalid requests) are replaced by a positive
  out-of-range sentinel and used with ``mode="drop"`` scatters or ``mode="fill"`` gathers.
  Never -1: JAX wraps negative indices, even in those modes.
- Batched operations take ``slots: int[B]``. A slot outside ``[0, num_slots)`` is padding, and
  a slot repeated in a batch counts only at its first occurrence. Requests are granted
  all-or-nothing, in batch order, stopping at the first one whose blocks do not fit: a request
  that needs no new block always succeeds, and a request that needs blocks never jumps ahead of
  an earlier one that could not get them (FCFS; the caller orders the batch). Failed requests
  change nothing.
- Blocks are shared by reference count (``fork``). Shared blocks are always full: a fork copies
  a partial last block into a fresh block for the child and returns the (src, dst) pairs for
  the caller to copy in the KV pool, so appends never write into a shared block.
- Allocation pops blocks from the top of the free stack (O(blocks taken)); freeing pushes the
  blocks whose count drops to zero. No operation scans the whole pool.

Layer groups: the table has a leading group axis ``G`` on its rows. Group g holds the block
ids of the layers ``EngineConfig.layer_groups`` assigns it, so a sequence can be resident in
some groups only, e.g. its lower layers on the GPU and its upper layers still on the host. All
groups draw from one pool: a block holds one group's layers (``CacheConfig.pool_layers``), and
reference counts and the free stack are shared, so blocks a group gives back serve any other.
A batched request names a slot and asks for it in every group ``groups: bool[G]`` selects
(default all), and it is granted whole: in all of them or in none. ``ok`` flags come back per
group (False in groups not asked for). With ``G = 1`` this is the usual single table.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from symphony_jax.config import EngineConfig

i32 = jnp.int32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockTable:
    """Block tables of all layer groups over one pool (G groups, S slots, MB columns, NB
    blocks). Inside this module the rows are also viewed flat, as one group of G * S slots."""

    block_ids: jax.Array  # i32[G, S, MB]  block of each slot's table column; 0 where unused
    num_tokens: jax.Array  # i32[G, S]     tokens stored by each slot (0: empty slot)
    ref_counts: jax.Array  # i32[NB]       table entries (and outside holders) referencing each
    free_stack: jax.Array  # i32[NB]       free block ids in free_stack[:free_top]
    free_top: jax.Array  # i32[]           number of free blocks
    block_size: int = dataclasses.field(metadata=dict(static=True))

    @property
    def num_groups(self) -> int:
        return self.num_tokens.shape[0]

    @property
    def num_slots(self) -> int:
        return self.num_tokens.shape[-1]

    @property
    def num_blocks(self) -> int:
        return self.ref_counts.shape[-1]

    @property
    def max_blocks_per_seq(self) -> int:
        return self.block_ids.shape[-1]

    @property
    def max_tokens_per_seq(self) -> int:
        return self.max_blocks_per_seq * self.block_size


@dataclasses.dataclass(frozen=True)
class BlockCopies:
    """KV blocks to copy after a fork (shapes: G groups, B forks)."""

    src: jax.Array  # i32[G, B]  block to read; 0 (null) where there is nothing to copy
    dst: jax.Array  # i32[G, B]  block to write; num_blocks (dropped) where nothing to copy


jax.tree_util.register_dataclass(BlockCopies, data_fields=["src", "dst"], meta_fields=[])


def create(num_slots: int, num_blocks: int, max_blocks_per_seq: int, block_size: int,
           num_groups: int = 1) -> BlockTable:
    """An empty table; ``num_blocks`` includes the null block."""
    for name, value, minimum in (("num_slots", num_slots, 1), ("num_blocks", num_blocks, 2),
                                 ("max_blocks_per_seq", max_blocks_per_seq, 1),
                                 ("block_size", block_size, 1), ("num_groups", num_groups, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ValueError(f"block_table.create: {name}={value!r}, expected an integer "
                             f">= {minimum}")
    # Stack bottom holds the highest id so that pops hand out low ids first.
    stack = np.zeros(num_blocks, np.int32)
    stack[: num_blocks - 1] = np.arange(num_blocks - 1, 0, -1)
    return BlockTable(
        block_ids=jnp.zeros((num_groups, num_slots, max_blocks_per_seq), i32),
        num_tokens=jnp.zeros((num_groups, num_slots), i32),
        ref_counts=jnp.zeros(num_blocks, i32),
        free_stack=jnp.asarray(stack),
        free_top=jnp.asarray(num_blocks - 1, i32),
        block_size=int(block_size),
    )


def from_config(config: EngineConfig) -> BlockTable:
    """The device block table of one node: a slot per request-table entry."""
    return create(num_slots=config.scheduler.slots,
                  num_blocks=config.cache.num_device_blocks,
                  max_blocks_per_seq=config.max_blocks_per_seq,
                  block_size=config.cache.block_size,
                  num_groups=config.cache.num_layer_groups)


# ----------------------------------------------------------------------------------------------
# Building blocks on the flat view: the groups' rows as one table of G * S slots, slot s of
# group g being flat slot g * S + s. A batch of B requests becomes B * G entries, request by
# request (each request's G entries together), and a request is granted only whole.


def _flat(t: BlockTable) -> BlockTable:
    G, S = t.num_tokens.shape
    return dataclasses.replace(t, block_ids=t.block_ids.reshape(G * S, -1),
                               num_tokens=t.num_tokens.reshape(G * S))


def _grouped(flat: BlockTable, num_groups: int) -> BlockTable:
    return dataclasses.replace(flat, block_ids=flat.block_ids.reshape(num_groups, -1,
                                                                       flat.max_blocks_per_seq),
                               num_tokens=flat.num_tokens.reshape(num_groups, -1))


def _entries(slots: jax.Array, groups: jax.Array, num_slots: int) -> tuple[jax.Array, jax.Array]:
    """Flat slots ``i32[B * G]`` of ``slots`` (i32[B], out of range: ``num_slots``) in each
    group, request by request, and which entries are asked for (bool[B * G], ``groups``'s);
    entries not asked for, and padding slots, get the flat sentinel ``G * num_slots``."""
    G = groups.shape[0]
    flat = jnp.arange(G, dtype=i32)[None, :] * num_slots + slots[:, None]
    asked = jnp.broadcast_to(groups[None, :], flat.shape)
    flat = jnp.where(asked & (slots[:, None] < num_slots), flat, G * num_slots)
    return flat.reshape(-1), asked.reshape(-1)


def _per_group(flags: jax.Array, num_groups: int) -> jax.Array:
    """Entry values ``[B * G]`` (request by request) as ``[G, B]``."""
    return flags.reshape(-1, num_groups).T


def _cdiv(a: jax.Array, b: int) -> jax.Array:
    return (a + b - 1) // b


def _sentinel(index: jax.Array, bound: int, keep: jax.Array | bool = True) -> jax.Array:
    """``index`` where ``keep`` and ``0 <= index < bound``, else ``bound`` (out of range)."""
    return jnp.where(keep & (index >= 0) & (index < bound), index, bound)


def _cumsum(x: jax.Array) -> jax.Array:
    """Inclusive prefix sum of a vector. ``jnp.cumsum`` lowers to a reduce-window that XLA:CPU
    runs in O(n^2); a parallel scan is O(n log n) on every backend."""
    return jax.lax.associative_scan(jnp.add, x)


def _first_valid(slots: jax.Array, num_slots: int) -> jax.Array:
    """bool[B]: the slot is in range and does not occur earlier in the batch."""
    order = jnp.arange(slots.shape[0], dtype=i32)
    first = jnp.full(num_slots + 1, slots.shape[0], i32).at[slots].min(order)
    return (slots < num_slots) & (first[slots] == order)


def _grant(need: jax.Array, valid: jax.Array, available: jax.Array, asked: jax.Array,
           unit: int):
    """Requests granted whole in batch order while their blocks fit (module doc). A request is
    ``unit`` consecutive entries (its groups); it is valid if every entry it asks for is.

    Returns ``ok: bool[E]`` and ``offset: i32[E]``, the blocks granted to earlier entries:
    requests that get blocks form a prefix of those needing any, so for each granted request
    the exclusive prefix sum of valid needs counts exactly the blocks popped before its own.
    """
    need = jnp.where(valid, need, 0).reshape(-1, unit)
    asked = asked.reshape(-1, unit)
    request_valid = jnp.all(valid.reshape(-1, unit) | ~asked, axis=1) & asked.any(axis=1)
    request_need = jnp.where(request_valid, need.sum(axis=1), 0)
    total = _cumsum(request_need)
    ok = request_valid & ((total <= available) | (request_need == 0))
    offset = (total - request_need)[:, None] + jnp.cumsum(need, axis=1) - need
    return (ok[:, None] & asked).reshape(-1), offset.reshape(-1)


def _pop(t: BlockTable, got: jax.Array, offset: jax.Array,
         width: int) -> tuple[jax.Array, jax.Array]:
    """Pop ``got[b]`` blocks (at most ``width``) for each request b, below ``offset[b]``
    blocks taken by earlier requests: (i32[B, width] block ids, bool[B, width] taken)."""
    k = jnp.arange(width, dtype=i32)
    taken = k[None, :] < got[:, None]
    position = t.free_top - 1 - (offset[:, None] + k[None, :])
    blocks = t.free_stack.at[_sentinel(position, t.num_blocks, taken)].get(
        mode="fill", fill_value=0)
    return blocks, taken


def _append(t: BlockTable, slots: jax.Array, num_new: jax.Array, valid: jax.Array,
            asked: jax.Array, unit: int, width: int) -> tuple[BlockTable, jax.Array]:
    """Grow each valid flat slot by ``num_new`` tokens, taking at most ``width`` new blocks
    each (entries ``[E]``, ``unit`` per request)."""
    S, NB = t.num_slots, t.num_blocks
    old = t.num_tokens.at[slots].get(mode="fill", fill_value=0)
    new = old + num_new
    first_col = _cdiv(old, t.block_size)
    need = _cdiv(new, t.block_size) - first_col
    # Compared as num_new <= room, not old + num_new <= limit, which could overflow int32.
    room = t.max_tokens_per_seq - old
    valid = valid & (num_new >= 0) & (num_new <= room) & (need <= width)
    ok, offset = _grant(need, valid, t.free_top, asked, unit)
    got = jnp.where(ok, need, 0)
    blocks, taken = _pop(t, got, offset, width)
    rows = jnp.where(taken, slots[:, None], S)
    cols = first_col[:, None] + jnp.arange(width, dtype=i32)[None, :]
    return dataclasses.replace(
        t,
        block_ids=t.block_ids.at[rows, cols].set(blocks, mode="drop"),
        num_tokens=t.num_tokens.at[_sentinel(slots, S, ok)].add(num_new, mode="drop"),
        ref_counts=t.ref_counts.at[_sentinel(blocks, NB, taken)].set(1, mode="drop"),
        free_top=t.free_top - got.sum(dtype=i32),
    ), ok


def _release(t: BlockTable, ids: jax.Array, mask: jax.Array) -> BlockTable:
    """Drop one reference to each block ``ids[e]`` where ``mask[e]``; blocks left unreferenced
    are pushed onto the free stack, each once even if several entries named it."""
    NB = t.num_blocks
    ids, mask = ids.reshape(-1), mask.reshape(-1)
    held = _sentinel(ids, NB, mask)
    ref_counts = t.ref_counts.at[held].add(-1, mode="drop")
    # A block whose count reached zero is pushed once, by the last of the entries that
    # referenced it: they all write their (negative, distinct) tags with a scatter-min and only
    # the winner reads its own tag back. Then the count is restored to zero.
    released = mask & (ref_counts.at[held].get(mode="fill", fill_value=1) == 0)
    released_ids = _sentinel(ids, NB, released)
    tags = -1 - jnp.arange(ids.size, dtype=i32)
    ref_counts = ref_counts.at[released_ids].min(tags, mode="drop")
    push = released & (ref_counts.at[released_ids].get(mode="fill", fill_value=0) == tags)
    ref_counts = ref_counts.at[released_ids].set(0, mode="drop")
    position = t.free_top + _cumsum(push.astype(i32)) - 1
    return dataclasses.replace(
        t, ref_counts=ref_counts,
        free_stack=t.free_stack.at[_sentinel(position, NB, push)].set(ids, mode="drop"),
        free_top=t.free_top + push.sum(dtype=i32))


def _referenced(t: BlockTable, blocks: jax.Array) -> jax.Array:
    """bool[K]: ``blocks`` that are real blocks (not null, in range) and referenced."""
    held = _sentinel(blocks, t.num_blocks, blocks > 0)
    return t.ref_counts.at[held].get(mode="fill", fill_value=0) > 0


# ----------------------------------------------------------------------------------------------
# Jitted operations on the grouped table (the public API below checks their arguments).


@functools.partial(jax.jit, donate_argnames="table", static_argnames=("width", "empty_only"))
def _append_grouped(table, slots, num_new_tokens, groups, width, empty_only):
    G, S = table.num_groups, table.num_slots
    entries, asked = _entries(_sentinel(slots, S), groups, S)
    flat = _flat(table)
    valid = _first_valid(entries, G * S)
    if empty_only:
        valid &= flat.num_tokens.at[entries].get(mode="fill", fill_value=1) == 0
    counts = (num_new_tokens.T.reshape(-1) if num_new_tokens.ndim == 2  # request by request
              else jnp.repeat(num_new_tokens, G))
    flat, ok = _append(flat, entries, counts, valid, asked, G, width)
    return _grouped(flat, G), _per_group(ok, G)


@functools.partial(jax.jit, donate_argnames="table")
def _free(table, slots, groups):
    G, S = table.num_groups, table.num_slots
    entries, _ = _entries(_sentinel(slots, S), groups, S)
    flat = _flat(table)
    valid = _first_valid(entries, G * S)
    rows = flat.block_ids.at[entries].get(mode="fill", fill_value=0)  # [E, MB]
    num_blocks = _cdiv(flat.num_tokens.at[entries].get(mode="fill", fill_value=0),
                       flat.block_size)
    owned = valid[:, None] & (jnp.arange(flat.max_blocks_per_seq, dtype=i32)[None, :]
                              < num_blocks[:, None])
    flat = _release(flat, rows, owned)
    cleared = _sentinel(entries, G * S, valid)
    return _grouped(dataclasses.replace(
        flat, block_ids=flat.block_ids.at[cleared].set(0, mode="drop"),
        num_tokens=flat.num_tokens.at[cleared].set(0, mode="drop")), G)


@functools.partial(jax.jit, donate_argnames="table")
def _release_blocks(table, blocks):
    return _release(table, blocks, _referenced(table, blocks))


@functools.partial(jax.jit, donate_argnames="table")
def _retain_blocks(table, blocks):
    held = _sentinel(blocks, table.num_blocks, _referenced(table, blocks))
    return dataclasses.replace(table, ref_counts=table.ref_counts.at[held].add(1, mode="drop"))


@functools.partial(jax.jit, donate_argnames="table")
def _adopt(table, slots, blocks, counts):
    """Group 0 of a one-group table: empty slots take the referenced ``blocks[b, :counts[b]]``
    as their first, full, blocks (one more reference each)."""
    t = dataclasses.replace(table, block_ids=table.block_ids[0], num_tokens=table.num_tokens[0])
    S, NB, MB = t.num_slots, t.num_blocks, t.max_blocks_per_seq
    slots = _sentinel(slots, S)
    taken = jnp.arange(MB, dtype=i32)[None, :] < counts[:, None]
    empty = t.num_tokens.at[slots].get(mode="fill", fill_value=1) == 0
    ok = (_first_valid(slots, S) & empty & (counts >= 0) & (counts <= MB)
          & jnp.all(_referenced(t, blocks) | ~taken, axis=1))
    rows = jnp.where(ok[:, None] & taken, blocks, 0)
    written = _sentinel(slots, S, ok)
    return dataclasses.replace(
        table,
        block_ids=t.block_ids.at[written].set(rows, mode="drop")[None],
        num_tokens=t.num_tokens.at[written].set(counts * t.block_size, mode="drop")[None],
        ref_counts=t.ref_counts.at[_sentinel(rows, NB, rows > 0)].add(1, mode="drop"),
    ), ok[None]


@functools.partial(jax.jit, donate_argnames="table")
def _fork(table, src, dst, groups):
    G, S = table.num_groups, table.num_slots
    src, asked = _entries(_sentinel(src, S), groups, S)
    dst, _ = _entries(_sentinel(dst, S), groups, S)
    t = _flat(table)
    NB, MB, bs = t.num_blocks, t.max_blocks_per_seq, t.block_size
    length = t.num_tokens.at[src].get(mode="fill", fill_value=0)
    dst_empty = t.num_tokens.at[dst].get(mode="fill", fill_value=1) == 0
    valid = (src < G * S) & (length > 0) & _first_valid(dst, G * S) & dst_empty
    num_full, partial = length // bs, length % bs != 0
    ok, offset = _grant(partial.astype(i32), valid, t.free_top, asked, G)
    got = (ok & partial).astype(i32)
    new_block = _pop(t, got, offset, 1)[0][:, 0]
    src_rows = t.block_ids.at[src].get(mode="fill", fill_value=0)  # [E, MB]
    cols = jnp.arange(MB, dtype=i32)[None, :]
    shared = ok[:, None] & (cols < num_full[:, None])
    copied = (got[:, None] == 1) & (cols == num_full[:, None])
    dst_rows = jnp.where(shared, src_rows, jnp.where(copied, new_block[:, None], 0))
    last = jnp.take_along_axis(src_rows, jnp.minimum(num_full, MB - 1)[:, None], axis=1)[:, 0]
    written = _sentinel(dst, G * S, ok)
    t = dataclasses.replace(
        t,
        block_ids=t.block_ids.at[written].set(dst_rows, mode="drop"),
        num_tokens=t.num_tokens.at[written].set(length, mode="drop"),
        ref_counts=(t.ref_counts.at[_sentinel(src_rows, NB, shared)].add(1, mode="drop")
                    .at[jnp.where(got == 1, new_block, NB)].set(1, mode="drop")),
        free_top=t.free_top - got.sum(dtype=i32),
    )
    copies = BlockCopies(_per_group(jnp.where(got == 1, last, 0), G),
                         _per_group(jnp.where(got == 1, new_block, NB), G))
    return _grouped(t, G), _per_group(ok, G), copies


@jax.jit
def _slot_mapping(table, slots, positions):
    G, S = table.num_groups, table.num_slots
    t = _flat(table)
    entries, _ = _entries(_sentinel(slots, S), jnp.ones(G, bool), S)
    flat_slots = _per_group(entries, G)  # [G, T]
    length = t.num_tokens.at[flat_slots].get(mode="fill", fill_value=0)  # [G, T]
    valid = (positions >= 0) & (positions < length)
    column = jnp.where(valid, positions // t.block_size, 0)
    block = t.block_ids.at[flat_slots, column].get(mode="fill", fill_value=0)
    return jnp.where(valid, block * t.block_size + positions % t.block_size,
                     t.num_blocks * t.block_size)


@jax.jit
def _can_allocate(table, num_tokens, groups):
    G = table.num_groups
    num_tokens = jnp.repeat(num_tokens, G)
    asked = jnp.tile(groups, num_tokens.shape[0] // G)
    valid = (num_tokens >= 0) & (num_tokens <= table.max_tokens_per_seq)
    ok, _ = _grant(_cdiv(num_tokens, table.block_size), valid, table.free_top, asked, G)
    return _per_group(ok, G)


# ----------------------------------------------------------------------------------------------
# The public, group-batched API.


def _batch(op: str, **arrays) -> list[jax.Array]:
    """Check that batch arguments are integer vectors of one length, as int32."""
    out, length = [], None
    for name, value in arrays.items():
        if not isinstance(value, (jax.Array, np.ndarray)):
            value = np.asarray(value)
        if value.ndim != 1 or not np.issubdtype(value.dtype, np.integer):
            raise ValueError(f"block_table.{op}: {name} must be a 1-D integer array, got "
                             f"{value.dtype}{list(value.shape)}")
        if length is not None and value.shape[0] != length:
            raise ValueError(f"block_table.{op}: {name} has length {value.shape[0]}, expected "
                             f"{length} like {next(iter(arrays))}")
        length = value.shape[0]
        if value.dtype != np.int32:
            if isinstance(value, np.ndarray) and value.size and (
                    value.min() < np.iinfo(np.int32).min or value.max() > np.iinfo(np.int32).max):
                raise ValueError(f"block_table.{op}: {name} has values outside int32")
            value = value.astype(np.int32)
        out.append(value)
    return out


def _check_groups(op: str, table: BlockTable, groups) -> jax.Array:
    if groups is None:
        return jnp.ones(table.num_groups, bool)
    if not isinstance(groups, (jax.Array, np.ndarray)):
        groups = np.asarray(groups)
    if groups.shape != (table.num_groups,) or groups.dtype != bool:
        raise ValueError(f"block_table.{op}: groups must be bool[{table.num_groups}], got "
                         f"{groups.dtype}{list(groups.shape)}")
    return groups


def _width(op: str, table: BlockTable, max_new_blocks: int | None) -> int:
    if max_new_blocks is None:
        return table.max_blocks_per_seq
    if not isinstance(max_new_blocks, int) or not 1 <= max_new_blocks <= table.max_blocks_per_seq:
        raise ValueError(f"block_table.{op}: max_new_blocks={max_new_blocks!r}, expected None "
                         f"or an integer in [1, {table.max_blocks_per_seq}]")
    return max_new_blocks


def allocate(table: BlockTable, slots, num_tokens, groups=None, *,
             max_new_blocks: int | None = None) -> tuple[BlockTable, jax.Array]:
    """Give empty slots room for their first ``num_tokens`` tokens.

    Returns the table and ``ok: bool[G, B]``. A request fails (and changes nothing) if its slot
    is not empty in a group asked for, its length exceeds the table width, it needs more than
    ``max_new_blocks`` blocks in a group (static; default: the table width), or its blocks do
    not fit (module doc).
    """
    slots, num_tokens = _batch("allocate", slots=slots, num_tokens=num_tokens)
    return _append_grouped(table, slots, num_tokens, _check_groups("allocate", table, groups),
                           width=_width("allocate", table, max_new_blocks), empty_only=True)


def reserve(table: BlockTable, slots, num_new_tokens, groups=None, *,
            max_new_blocks: int | None = None) -> tuple[BlockTable, jax.Array]:
    """Append ``num_new_tokens`` tokens to each slot, allocating the blocks they need.

    A decode step reserves 1 token per running sequence (``max_new_blocks=1`` then bounds the
    work by the batch size); a prefill chunk reserves its length. An empty slot is allocated.
    ``num_new_tokens`` is int[B], the same in every group, or int[G, B], per group (e.g. a
    sequence's tokens in the groups that lost them, and none in the others). Returns the table
    and ``ok: bool[G, B]``; failures are as for ``allocate`` (``max_new_blocks`` bounds each
    group's new blocks).
    """
    counts = num_new_tokens if isinstance(num_new_tokens, (jax.Array, np.ndarray)) else (
        np.asarray(num_new_tokens))
    if counts.ndim == 2:
        if counts.shape[0] != table.num_groups:
            raise ValueError(f"block_table.reserve: num_new_tokens must be int[B] or "
                             f"int[{table.num_groups}, B], got {list(counts.shape)}")
        rows = [_batch("reserve", slots=slots, num_new_tokens=row)[1] for row in counts]
        (slots,), num_new_tokens = _batch("reserve", slots=slots), jnp.stack(rows)
    else:
        slots, num_new_tokens = _batch("reserve", slots=slots, num_new_tokens=counts)
    return _append_grouped(table, slots, num_new_tokens, _check_groups("reserve", table, groups),
                           width=_width("reserve", table, max_new_blocks), empty_only=False)


def free(table: BlockTable, slots, groups=None) -> BlockTable:
    """Release the slots: their blocks lose a reference, blocks left unreferenced become free."""
    (slots,) = _batch("free", slots=slots)
    return _free(table, slots, _check_groups("free", table, groups))


def release(table: BlockTable, blocks) -> BlockTable:
    """Drop one reference to each of ``blocks`` (int[K]; entries outside ``[1, num_blocks)`` and
    unreferenced blocks are ignored): blocks left unreferenced become free. For references held
    outside any slot, such as a prefix cache's; a caller releases only references it holds."""
    (blocks,) = _batch("release", blocks=blocks)
    return _release_blocks(table, blocks)


def retain(table: BlockTable, blocks) -> BlockTable:
    """One more reference to each referenced block of ``blocks`` (int[K]; unreferenced blocks
    and entries outside ``[1, num_blocks)`` are ignored), held outside any slot."""
    (blocks,) = _batch("retain", blocks=blocks)
    return _retain_blocks(table, blocks)


def adopt(table: BlockTable, slots, blocks, counts) -> tuple[BlockTable, jax.Array]:
    """Give each empty slot ``slots[b]`` the already referenced (e.g. cached) blocks
    ``blocks[b, :counts[b]]`` as its first, full, blocks: one more reference each.

    ``blocks: int[B, max_blocks_per_seq]``. Fails (changing nothing) for a slot that is not
    empty or repeated, or a block that is not referenced. Returns the table and ``ok[1, B]``.
    Only for a one-group table: a block holds one group's layers, so two groups never share
    one.
    """
    if table.num_groups != 1:
        raise ValueError(f"block_table.adopt: the table has {table.num_groups} layer groups; "
                         "sharing blocks between sequences needs one")
    slots, counts = _batch("adopt", slots=slots, counts=counts)
    blocks = jnp.asarray(blocks, i32)
    if blocks.shape != (slots.shape[0], table.max_blocks_per_seq):
        raise ValueError(f"block_table.adopt: blocks must be int[{slots.shape[0]}, "
                         f"{table.max_blocks_per_seq}], got {list(blocks.shape)}")
    return _adopt(table, slots, blocks, counts)


def free_where(table: BlockTable, mask: jax.Array, chunk: int = 8) -> BlockTable:
    """Free the slots where ``mask`` (bool[S]), ``chunk`` at a time. Traceable."""
    return in_chunks(table, mask, free, chunk)


def in_chunks(table: BlockTable, mask: jax.Array, apply, chunk: int = 8) -> BlockTable:
    """``apply(table, slots)`` to the slots where ``mask`` (bool[S]), ``chunk`` slots per call
    (``int[chunk]``, padded with the sentinel S): a loop of ``ceil(count / chunk)`` rounds
    (none when the mask is empty), so the work follows the slots named, not the table's size.
    Traceable inside other jitted code."""
    S = mask.shape[0]

    def round_(carry):
        table, remaining = carry
        rank = jnp.cumsum(remaining) - 1
        take = remaining & (rank < chunk)
        slots = jnp.full(chunk, S, i32).at[jnp.where(take, rank, chunk)].set(
            jnp.arange(S, dtype=i32), mode="drop")
        return apply(table, slots), remaining & ~take

    return jax.lax.while_loop(lambda carry: carry[1].any(), round_, (table, mask))[0]


def fork(table: BlockTable, src, dst, groups=None) -> tuple[BlockTable, jax.Array, BlockCopies]:
    """Make each empty slot ``dst[b]`` a copy of the sequence in slot ``src[b]``.

    Full blocks are shared by reference count; a partial last block is given a fresh block,
    and ``copies`` names the (src, dst) block pairs whose KV the caller must copy. Fails for an
    empty source, a non-empty or repeated destination, or no free block for the copy.
    Returns the table, ``ok: bool[G, B]`` and the copies.
    """
    src, dst = _batch("fork", src=src, dst=dst)
    return _fork(table, src, dst, _check_groups("fork", table, groups))


def slot_mapping(table: BlockTable, slots, positions) -> jax.Array:
    """i32[G, T]: flat KV slot (``block * block_size + offset``) of each token in each group.

    Token t is at position ``positions[t]`` of the sequence in ``slots[t]``; positions outside
    the sequence's reserved tokens map to ``num_blocks * block_size``, out of range, so that a
    ``mode="drop"`` scatter of padding tokens writes nothing.
    """
    slots, positions = _batch("slot_mapping", slots=slots, positions=positions)
    return _slot_mapping(table, slots, positions)


def num_free_blocks(table: BlockTable) -> jax.Array:
    """i32[]: free blocks of the pool (each holds one group's layers)."""
    return table.free_top


def can_allocate(table: BlockTable, num_tokens, groups=None) -> jax.Array:
    """bool[G, B]: which of a batch of new requests ``allocate`` would grant, in this order
    (each in every group ``groups`` asks for)."""
    (num_tokens,) = _batch("can_allocate", num_tokens=num_tokens)
    return _can_allocate(table, num_tokens, _check_groups("can_allocate", table, groups))
