"""The host tier: sequences' K,V in a node's pinned host memory, bounded, least recently used
first out.

An entry holds one sequence's chunks (``transfer.Chunk``, layer-major, so that loading can go
layer by layer) in column order, and how many of its tokens they cover. Entries are keyed by
the owner's choice (the engine uses the sequence's slot). Capacity is counted in blocks, and
bytes follow (``block_bytes`` each). Adding chunks that do not fit evicts whole entries, least
recently used first, except those the caller protects; evictions are returned, never silent,
so that the owner can fall back to recomputing (or spill them to a slower tier).

A sequence's K,V is written once per block: ``extend`` appends chunks after those stored, and
only a trailing partial block (a sequence that had not filled its last block) is ever replaced.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Hashable, Iterable

from symphony_jax.memory.transfer import Chunk


class HostTierFull(Exception):
    """Chunks that do not fit even after evicting every unprotected entry."""


@dataclasses.dataclass
class Entry:
    chunks: list[Chunk]  # in column order, contiguous from column 0
    tokens: int  # tokens of the sequence they cover

    @property
    def num_blocks(self) -> int:
        return sum(c.num_blocks for c in self.chunks)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.chunks)

    def is_ready(self) -> bool:
        return all(c.is_ready() for c in self.chunks)


class HostTier:
    def __init__(self, capacity_blocks: int, block_bytes: int):
        if capacity_blocks < 0 or block_bytes < 1:
            raise ValueError(f"HostTier: capacity_blocks={capacity_blocks} must be >= 0 and "
                             f"block_bytes={block_bytes} >= 1")
        self.capacity_blocks, self.block_bytes = capacity_blocks, block_bytes
        self.entries: collections.OrderedDict[Hashable, Entry] = collections.OrderedDict()
        self.used_blocks = 0
        self.evictions = 0  # entries evicted to make room
        self.evicted_tokens = 0  # tokens they covered

    @property
    def capacity_bytes(self) -> int:
        return self.capacity_blocks * self.block_bytes

    @property
    def used_bytes(self) -> int:
        return self.used_blocks * self.block_bytes

    def __contains__(self, key: Hashable) -> bool:
        return key in self.entries

    def get(self, key: Hashable) -> Entry | None:
        return self.entries.get(key)

    def tokens(self, key: Hashable) -> int:
        entry = self.entries.get(key)
        return entry.tokens if entry else 0

    def written_blocks(self, key: Hashable, block_size: int) -> int:
        """Blocks of ``key`` stored and never to change: its full blocks."""
        return self.tokens(key) // block_size

    def touch(self, key: Hashable) -> None:
        if key in self.entries:
            self.entries.move_to_end(key)

    def drop(self, key: Hashable) -> Entry | None:
        entry = self.entries.pop(key, None)
        if entry is not None:
            self.used_blocks -= entry.num_blocks
        return entry

    def extend(self, key: Hashable, chunks: Iterable[Chunk], tokens: int, *,
               protect: Iterable[Hashable] = ()) -> list[tuple[Hashable, Entry]]:
        """Store ``chunks`` of ``key`` (the first one may start at a trailing partial block
        already stored, which it replaces) covering its first ``tokens`` tokens; returns the
        entries evicted for room. Raises ``HostTierFull`` (storing nothing) when they cannot
        fit."""
        chunks = list(chunks)
        entry = self.entries.get(key) or Entry([], 0)
        first = chunks[0].first_block if chunks else entry.num_blocks
        kept = [c for c in entry.chunks if c.first_block + c.num_blocks <= first]
        if sum(c.num_blocks for c in kept) != first:
            raise ValueError(f"HostTier.extend({key!r}): chunks start at block {first}, but "
                             f"{entry.num_blocks} blocks are stored")
        grow = sum(c.num_blocks for c in chunks) - (entry.num_blocks - first)
        evicted = self._make_room(grow, {key, *protect})
        self.used_blocks += grow
        self.entries[key] = Entry(kept + chunks, tokens)
        self.entries.move_to_end(key)
        return evicted

    def _make_room(self, blocks: int, protect: set) -> list[tuple[Hashable, Entry]]:
        spare = self.capacity_blocks - self.used_blocks
        if blocks <= spare:
            return []
        candidates = [k for k in self.entries if k not in protect]  # least recent first
        if blocks > spare + sum(self.entries[k].num_blocks for k in candidates):
            raise HostTierFull(f"{blocks} blocks do not fit a host tier of "
                               f"{self.capacity_blocks} blocks ({self.used_blocks} used)")
        evicted = []
        for key in candidates:
            if blocks <= spare:
                break
            entry = self.drop(key)
            spare += entry.num_blocks
            self.evictions += 1
            self.evicted_tokens += entry.tokens
            evicted.append((key, entry))
        return evicted
