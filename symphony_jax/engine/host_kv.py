"""The engine's side of the host tier: which K,V to copy when, and telling the scheduler.

Each step, after ``schedule``, the engine hands ``dispatch`` what the plan says: slots preempted
by swap (``offloads``) are copied to the host tier; slots holding a session under retention
``host`` have their new full blocks written back (and, once idle, their last partial block),
so the host copy stays current and dropping the device copy later costs nothing; restored
slots (``restore_groups``) get the layer groups they miss back (all of them, or the upper ones a
purge took) — loaded layer by layer by the step itself with ``layerwise_loading``, else copied
to the device now and scattered into the pool once there. Host chunks keep each layer group's
arrays apart, so only missing groups cross to the device.
Every copy is dispatched at once and never waited for; ``poll``, at the start of each step,
turns the completed ones into the scheduler's ``tiers`` transitions. A step therefore waits only
for the chunks it loads itself.

Host entries are keyed by slot (a session keeps its slot between turns). Entries evicted for
room, copies that find no room and entries of slots handed to another sequence are reported
to the scheduler as ``lost``: those sequences recompute, and ``stats`` counts them. With a disk
tier, a session's entry evicted from the host is saved to disk first (keyed by session) and
comes back to the host when the session's next request is admitted (``admitted``); a disk
entry that cannot be read is dropped and the session recomputes. Disk reads and writes run on
the engine's thread.

Migration between nodes (SYMPHONY's node manager): ``export`` copies an idle session's K,V to
another node's host memory (from this host tier when it holds it, else gathered from the pool);
the receiving node's ``migrate_in`` stores it in its host tier for a slot adopted for the
session, and once stored it is prefetched into free blocks (never evicting anything), so the
session's next request finds it on the device. Until then ``busy`` tells the engine to hold that
request back.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from symphony_jax.config import EngineConfig
from symphony_jax.engine.device_step import DeviceState, Restores, pack
from symphony_jax.memory import transfer
from symphony_jax.memory.disk_tier import DiskTier, DiskTierError, tokens_digest
from symphony_jax.memory.host_tier import HostTier, HostTierFull
from symphony_jax.scheduler import batch, tiers
from symphony_jax.scheduler import state as S
from symphony_jax.scheduler.policy import Policy

log = logging.getLogger(__name__)


@dataclasses.dataclass
class HostStats:
    swapped_out: int = 0  # sequences preempted by swap whose K,V was copied out
    written_back: int = 0  # write-back copies (retention ``host``)
    restored: int = 0  # sequences whose K,V came back from the host tier
    lost: int = 0  # host copies lost (evicted, no room, unreadable): those sequences recompute
    disk_faults: int = 0  # disk entries not saved, loaded or removed (``DiskTierError``, logged)
    to_disk: int = 0  # sessions' entries saved to the disk tier
    from_disk: int = 0  # and read back
    migrated_out: int = 0  # idle sessions' K,V copied to another node
    migrated_in: int = 0  # and received from one
    prefetched: int = 0  # idle sessions' K,V copied from the host tier into free blocks
    blocks_out: int = 0  # pool blocks (one layer group's layers) copied device -> host
    blocks_in: int = 0  # and host -> device


@dataclasses.dataclass
class _Copy:
    slot: int
    generation: int  # the slot's host entry generation when issued (stale if it changed)
    tokens: int  # tokens the host tier holds once it completes
    transfer: transfer.Transfer
    migrated: bool = False  # from another node: prefetched into free blocks once stored


class HostKV:
    def __init__(self, config: EngineConfig, policy: Policy, device, sessions: np.ndarray,
                 tokens_of: Callable[[int], list[int]], disk: DiskTier | None = None,
                 copy_completion: str = "polled"):
        """``sessions``: each slot's session (``state.NO_SESSION``: none), kept current by the
        engine; ``tokens_of(slot)``: the token ids of the slot's sequence known so far.
        ``copy_completion``: when a copy counts as complete at a ``poll``
        (``transfer.Transfer.complete``)."""
        self.tokens_of, self.copy_completion = tokens_of, copy_completion
        model, cache = config.model, config.cache
        block_bytes = (2 * model.num_layers * model.num_kv_heads * cache.block_size
                       * model.head_dim * np.dtype(model.dtype).itemsize)
        self.tier = HostTier(cache.num_host_blocks, block_bytes)
        self.config, self.policy, self.device = config, policy, device
        self.sessions, self.disk = sessions, disk
        self.block_size = cache.block_size
        self.num_groups = cache.num_layer_groups
        self.largest = 1 << (config.max_blocks_per_seq.bit_length() - 1)  # longest chunk
        R = config.scheduler.slots
        self.generation = np.zeros(R, np.int64)
        self.stored_tokens = np.zeros(R, np.int64)  # what the scheduler was told is stored
        self.offloading: list[_Copy] = []  # device -> host, in flight
        self.loading: dict[int, _Copy] = {}  # host -> device, in flight (load-then-compute)
        self.to_prefetch: set[int] = set()  # idle slots migrated in, waiting for free blocks
        self.prefetching: set[int] = set()  # of the slots loading, idle ones (``PREFETCHING``)
        self._stored: list[tuple[int, int]] = []
        self._lost: list[int] = []
        self.stats = HostStats()

    # ------------------------------------------------------------ slots changing hands

    def forget(self, slot: int) -> None:
        """``slot``'s sequence is gone (aborted, or the slot given to another sequence)."""
        self.tier.drop(slot)
        self.loading.pop(slot, None)
        self.to_prefetch.discard(slot)
        self.prefetching.discard(slot)
        self.generation[slot] += 1
        self.stored_tokens[slot] = 0

    def admitted(self, device: DeviceState, prompts: list[tuple[int, list[int]]]) -> DeviceState:
        """Bring back from disk the entries of the sessions admitted, ``(slot, prompt)`` each,
        and tell the scheduler they are stored. An entry is used only if it holds the K,V of a
        prefix of the prompt short of its last token (which the request computes)."""
        slots = [slot for slot, _ in prompts]
        self.to_prefetch.difference_update(slots)  # their requests restore what they need
        promoted = []
        for slot, prompt in prompts:
            session = int(self.sessions[slot])
            if self.disk is None or session == S.NO_SESSION or session not in self.disk:
                continue
            try:
                entry = self.disk.load(session, self.device, prompt[:-1])
            except DiskTierError as e:
                self._disk_fault(e)
                self.stats.lost += 1
                continue
            finally:
                self._drop_from_disk(session)
            if self._store(slot, entry.chunks, entry.tokens, set(slots)):
                promoted.append((slot, entry.tokens))
                self.stored_tokens[slot] = entry.tokens
                self.stats.from_disk += 1
        if not promoted:
            return device
        slots, tokens = zip(*promoted)
        return dataclasses.replace(device, scheduler=tiers.stored(
            device.scheduler, *self._padded(slots, tokens)))

    # ------------------------------------------------------------ each step

    def busy(self, slot: int) -> bool:
        """Whether K,V migrated to ``slot`` is still on its way to the host tier or into its
        blocks (its session's next request waits for it)."""
        return slot in self.prefetching or any(c.slot == slot and c.migrated
                                               for c in self.offloading)

    def poll(self, device: DeviceState, free_blocks: int) -> DeviceState:
        """Apply what completed: stored copies, loads now on the device (scattered into the
        pool), and losses; then prefetch migrated sessions into ``free_blocks`` blocks."""
        ready = [c.transfer.complete(self.copy_completion) for c in self.offloading]
        done = [c for c, r in zip(self.offloading, ready) if r]
        self.offloading = [c for c, r in zip(self.offloading, ready) if not r]
        for c in done:
            if c.generation == self.generation[c.slot]:
                self._stored.append((c.slot, c.tokens))
                self.stored_tokens[c.slot] = c.tokens
                if c.migrated:
                    self.to_prefetch.add(c.slot)
        pool, table = device.pool, device.scheduler.blocks.block_ids
        loaded = [s for s, c in self.loading.items()
                  if c.transfer.complete(self.copy_completion)]
        for slot in loaded:
            self.prefetching.discard(slot)
            for chunk in self.loading.pop(slot).transfer.chunks:
                pool = transfer.write(pool, chunk, table, slot)
        scheduler = device.scheduler
        if self._stored:
            slots, tokens = zip(*self._stored)
            scheduler = tiers.stored(scheduler, *self._padded(slots, tokens))
        if loaded:
            scheduler = tiers.loaded(scheduler, self._padded(loaded)[0])
        if self._lost:
            scheduler = tiers.lost(scheduler, self._padded(self._lost)[0])
        self._stored, self._lost = [], []
        scheduler = self._prefetch(scheduler, free_blocks)
        return dataclasses.replace(device, scheduler=scheduler, pool=pool)

    def dispatch(self, device: DeviceState, block_ids_before, tokens_before: np.ndarray,
                 offloads: np.ndarray, restore_groups: np.ndarray, sessions: np.ndarray,
                 idle: np.ndarray) -> tuple[Restores | None, ...] | None:
        """Start the copies a schedule asks for (see the module doc). ``tokens_before``,
        ``block_ids_before``: each slot's cached tokens and block ids before it;
        ``restore_groups``: the upper layer groups each slot restores (0: none); ``sessions``:
        slots holding a session's sequence (written back under retention ``host``);
        ``idle``: of which those with no request running. Returns each layer group's ``Restores``
        that the next step loads layer by layer, if any."""
        restoring = {int(s): int(restore_groups[s]) for s in np.flatnonzero(restore_groups)}
        loads = self._restore(device, restoring)
        protect = set(restoring) | set(self.loading)
        for slot in np.flatnonzero(offloads):
            self.stats.swapped_out += self._write(device, block_ids_before, int(slot),
                                                  int(tokens_before[slot]), True, protect)
        if self.policy.retention == "host":
            for slot in np.flatnonzero(sessions & ~offloads.astype(bool)):
                whole = bool(idle[slot])  # an idle sequence's last partial block too
                self.stats.written_back += self._write(device, block_ids_before, int(slot),
                                                       int(tokens_before[slot]), whole, protect)
        return loads

    # ------------------------------------------------------------ internals

    def _padded(self, slots, values=None) -> tuple[jnp.ndarray, ...]:
        R = self.config.scheduler.slots
        if values is None:
            return (jnp.asarray(batch.padded(slots, R, R)),)
        return jnp.asarray(batch.padded(slots, R, R)), jnp.asarray(batch.padded(values, R, 0))

    def _stored_blocks(self, slot: int) -> int:
        """Table columns of ``slot``'s stored tokens (one group's blocks)."""
        return -(-int(self.stored_tokens[slot]) // self.block_size)

    def _stored_chunks(self, slot: int, groups: range) -> tuple[transfer.Chunk, ...]:
        """Layer ``groups`` of the host chunks holding ``slot``'s stored tokens (it is stored,
        and protected), to be copied to the device."""
        entry, need = self.tier.get(slot), self._stored_blocks(slot)
        mine = tuple(c.groups(groups.start, groups.stop) for c in entry.chunks
                     if c.first_block < need)
        self.tier.touch(slot)
        self.stats.blocks_in += sum(c.pool_blocks for c in mine)
        return mine

    def _load(self, slot: int, chunks: tuple[transfer.Chunk, ...]) -> None:
        self.loading[slot] = _Copy(slot, int(self.generation[slot]), 0,
                                   transfer.to_device(chunks, self.device))

    def _restore(self, device: DeviceState,
                 slots: dict[int, int]) -> tuple[Restores | None, ...] | None:
        """Start restoring the upper ``slots[slot]`` layer groups of each slot: copied now, or
        returned by group for the step to load (``layerwise_loading``)."""
        by_group = [[] for _ in range(self.num_groups)]  # (k, v, slot, first block)
        for slot, missing in slots.items():
            mine = self._stored_chunks(slot, range(self.num_groups - missing, self.num_groups))
            self.stats.restored += 1
            if not self.policy.layerwise_loading:
                self._load(slot, mine)
                continue
            for c in mine:
                for i, (k, v) in enumerate(zip(c.k, c.v)):
                    by_group[c.first_group + i].append((k, v, slot, c.first_block))
        return self._pack(by_group)

    def _pack(self, by_group: list[list[tuple]]) -> tuple[Restores | None, ...] | None:
        """Each layer group's ``(k, v, slot, first block)`` chunks copied into one host buffer
        per group, of a power-of-two number of blocks that every group loaded shares
        (``StepShape.restores``): the step compiles for that number, not for the chunks."""
        loaded = [g for g, chunks in enumerate(by_group) if chunks]
        if not loaded:
            return None
        most = max(sum(k.shape[2] for k, *_ in chunks) for chunks in by_group)
        num_blocks = batch.bucket(most, self.config.cache.num_device_blocks)
        return tuple(None if g < loaded[0] else
                     pack(self.config, g, chunks, num_blocks, self.device)
                     for g, chunks in enumerate(by_group))

    def _prefetch(self, scheduler, free_blocks: int):
        """Give free blocks to the sessions to prefetch (``tiers.prefetch``: lower layer groups
        first, in slot order while they fit) and start copying the groups given in."""
        slots = [s for s in sorted(self.to_prefetch) if self._stored_blocks(s) <= free_blocks]
        if not slots:
            return scheduler
        scheduler, given = tiers.prefetch(scheduler, self._padded(slots)[0])
        for slot, groups in zip(slots, np.asarray(given).T):
            if groups.any():  # a run of groups: from the first missing one while they fit
                self.to_prefetch.discard(slot)
                self.prefetching.add(slot)
                self.stats.prefetched += 1
                given_groups = np.flatnonzero(groups)
                self._load(slot, self._stored_chunks(
                    slot, range(given_groups[0], given_groups[-1] + 1)))
        return scheduler

    # ------------------------------------------------------------ migration

    def export(self, device: DeviceState, slot: int, tokens: int,
               sharding) -> tuple[transfer.Chunk, ...]:
        """Start copying the K,V of ``slot``'s first ``tokens`` tokens (an idle session's) to
        ``sharding`` (another node's host memory): from the host tier when it holds them, else
        gathered from the pool (dispatched before any step that could reuse its blocks)."""
        entry, blocks = self.tier.get(slot), -(-tokens // self.block_size)
        if entry is not None and entry.tokens >= tokens:
            chunks = tuple(c for c in entry.chunks if c.first_block < blocks)
        else:  # full blocks, then the partial one apart (the receiver's write-back replaces it)
            full = tokens // self.block_size
            runs = [(0, full), (full, blocks - full)]
            chunks = tuple(c for first, n in runs if n for c in transfer.offload(
                device.pool, device.scheduler.blocks.block_ids, slot, first, n,
                layer_groups=self.config.layer_groups, largest=self.largest).chunks)
        self.stats.migrated_out += 1
        return tuple(transfer.Chunk(c.first_block, *jax.device_put((c.k, c.v), sharding))
                     for c in chunks)

    def migrate_in(self, slot: int, chunks: tuple[transfer.Chunk, ...], tokens: int) -> bool:
        """Store a session's K,V migrated to this node's host memory (``chunks``, possibly
        still in flight) for ``slot``, adopted for it; False (the slot's copy lost) if it does
        not fit."""
        if not self._store(slot, chunks, tokens, set(self.loading)):
            return False
        self.offloading.append(_Copy(slot, int(self.generation[slot]), tokens,
                                     transfer.Transfer(chunks), migrated=True))
        self.stats.migrated_in += 1
        return True

    def _write(self, device: DeviceState, block_ids, slot: int, tokens: int, whole: bool,
               protect: set) -> int:
        """Copy ``slot``'s blocks not yet on the host (full ones; with ``whole`` its last
        partial one too); returns 1 if a copy was issued."""
        written = self.tier.written_blocks(slot, self.block_size)
        full = tokens // self.block_size
        partial = whole and tokens % self.block_size > 0
        if tokens <= self.tier.tokens(slot) or (full <= written and not partial):
            return 0
        if any(c.slot == slot for c in self.offloading):  # one copy of a slot at a time
            return 0
        runs = transfer.split(written, full - written, self.largest)
        if partial:
            runs.append((full, 1))
        chunks = tuple(chunk for first, n in runs for chunk in transfer.offload(
            device.pool, block_ids, slot, first, n, layer_groups=self.config.layer_groups,
            largest=self.largest).chunks)
        covered = tokens if partial else full * self.block_size
        if not self._store(slot, chunks, covered, protect):
            return 0
        self.offloading.append(_Copy(slot, int(self.generation[slot]), covered,
                                     transfer.Transfer(chunks)))
        self.stats.blocks_out += sum(c.pool_blocks for c in chunks)
        return 1

    def _store(self, slot: int, chunks, tokens: int, protect: set) -> bool:
        """Put ``chunks`` in the host tier, evicting (to disk, if there is one) for room;
        ``slot``'s host copy is lost if they cannot fit."""
        try:
            evicted = self.tier.extend(slot, chunks, tokens, protect=protect)
        except HostTierFull:
            self._lose(slot)
            return False
        for key, entry in evicted:
            session = int(self.sessions[key])
            if self.disk is not None and session != S.NO_SESSION:
                self._save_to_disk(session, entry, self.tokens_of(key))
            self._lose(key)
        return True

    def _save_to_disk(self, session: int, entry, tokens: list[int]) -> None:
        """Save ``session``'s host ``entry`` (the K,V of the first ``entry.tokens`` of
        ``tokens``); a fault loses it."""
        jax.block_until_ready([(c.k, c.v) for c in entry.chunks])
        try:
            self.disk.save(session, entry, tokens_digest(tokens[:entry.tokens]))
        except DiskTierError as e:
            self._disk_fault(e)
            return
        self.stats.to_disk += 1

    def _drop_from_disk(self, session: int) -> None:
        try:
            self.disk.drop(session)
        except DiskTierError as e:
            self._disk_fault(e)

    def _disk_fault(self, error: DiskTierError) -> None:
        """A disk entry lost to ``error``: logged and counted; its session recomputes."""
        log.warning("disk tier: %s", error)
        self.stats.disk_faults += 1

    def _lose(self, slot: int) -> None:
        self.forget(slot)
        self._lost.append(slot)
        self.stats.lost += 1
