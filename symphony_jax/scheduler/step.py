"""One scheduling step: ``schedule -> (state, plan)``, the executor runs it, ``commit``.

``schedule`` decides which slots compute how many tokens:

1. Idle sessions whose retention expired lose their K,V.
2. Active slots (running, waiting, preempted) are ordered by the policy: ``decode_first`` puts
   running sequences that are decoding first, then running prompts, then waiting ones;
   ``prefill_first`` puts waiting and prompting sequences before decoding ones. Within a group,
   ``fcfs`` orders by arrival, ``priority`` by priority then arrival (request id breaks ties).
3. In that order each slot asks for the tokens it knows but has not cached; the token budget is
   handed out in order (a prompt may be cut into a chunk, or with ``chunked_prefill=False`` runs
   whole or not at), and at most ``max_num_seqs`` slots run.
4. Memory: running slots' blocks come first. While they do not fit, the least recently used idle
   session loses its K,V, else the last running slot in order is preempted (its K,V dropped;
   it waits to recompute, or with ``swap`` it waits, ``OFFLOADED``, for the copy of its K,V
   to the host tier; if the host holds all of it already, it waits restorable at once).
   Waiting slots then take blocks in order while they fit (idle sessions giving way first); a
   waiting slot that does not fit, and every one after it, waits.
   An idle session whose host copy holds everything it has on the device loses only its
   upper-most resident layer group at a time (SYMPHONY's purge): what it gives is free to drop,
   and its lower layers stay for its next request.
5. A restorable slot (a waiting slot missing layer groups that the host tier holds: all of them,
   or the upper ones a purge took) is scheduled as if its host tokens were cached, and blocks
   are reserved for them in the groups it misses: with ``layerwise_loading`` it runs in this
   step while they are copied back layer by layer; otherwise it gives its tokens back for this
   step and waits, ``LOADING``, for the copy.

Running work is never preempted for waiting work. The plan lists each slot's query length, the
slots in batch order, and which slots sample a token (their step reaches the last known token).
``commit`` counts the sampled tokens, finishes requests on a stop flag or at ``max_new_tokens``,
and applies the retention policy.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from symphony_jax.config import SchedulerConfig
from symphony_jax.memory import block_table as bt
from symphony_jax.scheduler import prefix_cache, sorting
from symphony_jax.scheduler import state as S
from symphony_jax.scheduler.policy import Policy

i32, f32 = jnp.int32, jnp.float32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepPlan:
    """What one step runs (R slots)."""

    query_lens: jax.Array  # i32[R]  tokens each slot computes (0: not scheduled)
    order: jax.Array  # i32[R]       scheduled slots in batch order, then R (padding)
    num_seqs: jax.Array  # i32[]     scheduled slots
    num_tokens: jax.Array  # i32[]   scheduled tokens
    samples: jax.Array  # bool[R]    the slot's step ends at its last known token: sample one
    preempted: jax.Array  # bool[R]  lost its K,V this step to make room
    offloads: jax.Array  # bool[R]   of which, slots whose K,V the executor copies to the host
    #                                 (swap: its blocks are reused only after that copy, in
    #                                 dispatch order)
    restores: jax.Array  # bool[R]   slots whose host K,V is copied back into blocks reserved
    #                                 for it this step (``host_tokens`` of them)
    restore_groups: jax.Array  # i32[R]  of which, the layer groups missing on the device (the
    #                                 upper ones): only their layers need the copy
    evicted: jax.Array  # bool[R]    idle session that lost its K,V (or some layer groups of it)
    #                                 this step
    decode_only: jax.Array  # bool[] every scheduled slot computes exactly one token


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Room:
    """Scheduling under way: slots losing K,V to make room, and each slot's tokens."""

    table: bt.BlockTable
    cache: prefix_cache.PrefixCache
    status: jax.Array  # i32[R]
    grant: jax.Array  # i32[R]      tokens granted this step
    evicted: jax.Array  # bool[R]   idle sessions that lost their K,V
    preempted: jax.Array  # bool[R]  running slots that lost their K,V
    denied: jax.Array  # bool[R]    waiting slots that do not fit this step
    changed: jax.Array  # bool[]    the last round denied a slot


def _until_room(room: _Room, shortfall, can_make_room, make_room) -> tuple[_Room, jax.Array]:
    """Make room while ``shortfall(room) -> (after, blocks missing)`` is positive and
    something can give way; returns the room and the last ``after``."""
    def short(carry):
        room, after, missing = carry
        return (missing > 0) & can_make_room(room, after)

    def give_way(carry):
        room, after, missing = carry
        room = make_room(room, missing, after)
        return (room, *shortfall(room))

    room, after, _ = jax.lax.while_loop(short, give_way, (room, *shortfall(room)))
    return room, after


def _order(r: S.Requests, known, cached, policy: Policy) -> jax.Array:
    """Active slots in scheduling order, then the others (i32[R])."""
    running, decoding = r.status == S.RUNNING, known - cached == 1
    waiting = (r.status == S.WAITING) | (r.status == S.PREEMPTED)
    if policy.prefill == "decode_first":
        group = jnp.select([running & decoding, running, waiting], [0, 1, 2], 3)
    else:
        group = jnp.select([waiting, running & ~decoding, running], [0, 1, 2], 3)
    by_priority = (r.priority,) if policy.order == "priority" else ()
    return sorting.lexsort((r.request_id, r.arrival, *by_priority, group))


def _budget(want: jax.Array, limits: SchedulerConfig, chunked: bool) -> jax.Array:
    """Tokens granted to each slot of ``want`` (in scheduling order)."""
    before = jnp.cumsum(want) - want
    if chunked:
        got = jnp.clip(limits.max_num_batched_tokens - before, 0, want)
    else:
        got = jnp.where(before + want <= limits.max_num_batched_tokens, want, 0)
    return jnp.where(jnp.cumsum(got > 0) <= limits.max_num_seqs, got, 0)


def blocks_needed(cached: jax.Array, tokens: jax.Array, block_size: int) -> jax.Array:
    return -(-(cached + tokens) // block_size) - (-(-cached // block_size))


def _overlap(start, length, end) -> jax.Array:
    """Length of [start, start + length) within [0, end)."""
    return jnp.clip(jnp.minimum(start + length, end) - start, 0, None)


def _reserve(table: bt.BlockTable, grant: jax.Array, batch: jax.Array,
             limits: SchedulerConfig, restores: bool, chunk: int = 8) -> bt.BlockTable:
    """Reserve the granted tokens (``i32[G, R]``, per layer group; they fit; ``batch`` lists
    the scheduled slots first). Most slots need at most one new block (decode tokens, small
    chunks): they are reserved together, one block wide, over the first ``max_num_seqs`` slots
    of the batch; the others are reserved ``chunk`` at a time, as wide as a whole budget — or a
    whole sequence when ``restores`` (a restored slot reserves its host tokens too) — so the
    work follows what is reserved."""
    R = grant.shape[1]
    need = blocks_needed(table.num_tokens, grant, table.block_size)
    head = batch[: limits.max_num_seqs]
    some = (grant > 0).any(axis=0)
    narrow = some & (need <= 1).all(axis=0) & jnp.zeros(R, bool).at[head].set(True)
    table, _ = bt.reserve(table, jnp.where(narrow[head], head, R), grant[:, head],
                          max_new_blocks=1)
    width = table.max_blocks_per_seq if restores else min(
        -(-limits.max_num_batched_tokens // table.block_size) + 1, table.max_blocks_per_seq)

    def reserve_wide(table, slots):
        counts = grant.at[:, slots].get(mode="fill", fill_value=0)
        return bt.reserve(table, slots, counts, max_new_blocks=width)[0]

    return bt.in_chunks(table, some & ~narrow, reserve_wide, chunk)


@functools.partial(jax.jit, donate_argnames="state", static_argnames=("limits", "policy"))
def schedule(state: S.SchedulerState, now, *, limits: SchedulerConfig, policy: Policy):
    """Decide this step (see the module doc). Returns the state (blocks reserved for the
    scheduled tokens) and the ``StepPlan``."""
    if not policy.chunked_prefill and limits.max_num_batched_tokens < limits.max_model_len:
        raise ValueError(
            f"schedule: without chunked prefill a prompt runs whole, so max_num_batched_tokens="
            f"{limits.max_num_batched_tokens} must be >= max_model_len={limits.max_model_len} "
            "(else a long prompt never runs and blocks every request behind it)")
    R = state.num_slots
    r, table = state.requests, state.blocks
    slots = jnp.arange(R, dtype=i32)
    expired = (r.status == S.FINISHED) & (r.expiry <= now)
    evicted = expired & (state.cached_tokens > 0)
    table = bt.free_where(table, evicted)
    r = dataclasses.replace(r, status=jnp.where(expired, S.EMPTY, r.status))

    is_waiting = lambda status: (status == S.WAITING) | (status == S.PREEMPTED)
    known = r.prompt_len + r.num_generated
    # Layer groups a waiting slot misses that the host tier holds (all, or those a purge took);
    # never more tokens than the sequence has before its last (which it computes).
    usable = is_waiting(r.status) & (r.host_tokens > 0) & (r.host_tokens < known)
    missing = usable[None] & (table.num_tokens == 0)
    restorable = missing.any(axis=0)
    from_host = jnp.where(missing, r.host_tokens, 0)  # i32[G, R]: restored if the slot runs
    cached = jnp.where(restorable, r.host_tokens, table.num_tokens[0])
    active = (r.status == S.RUNNING) | is_waiting(r.status)
    order = _order(r, known, cached, policy)
    position = jnp.zeros(R, i32).at[order].set(slots)  # rank of each slot in the order
    want = jnp.where(active, known - cached, 0)
    free_blocks = lambda table: table.free_top

    def needs(room: _Room, mask) -> jax.Array:
        """Blocks of the pool each slot in ``mask`` takes for its grant, in every layer group
        (and for the host tokens of the groups it restores)."""
        grant = room.grant + jnp.where(room.grant > 0, from_host, 0)
        need = blocks_needed(room.table.num_tokens, grant, room.table.block_size).sum(axis=0)
        return jnp.where(mask, need, 0)

    def running_deficit(room: _Room) -> jax.Array:
        return needs(room, room.status == S.RUNNING).sum() - free_blocks(room.table)

    def first_misfit(room: _Room):
        """The rank of the first waiting slot whose blocks do not fit, in order, after the
        running slots' (R if none), and the blocks it misses."""
        spare = -running_deficit(room)
        need = needs(room, is_waiting(room.status) & (room.grant > 0))[order]
        total = jnp.cumsum(need)
        fit = jnp.cumprod((total <= spare) | (need == 0)).astype(bool)
        rank = jnp.where(fit.all(), R, jnp.argmin(fit))
        return rank, jnp.where(fit.all(), 0, total[jnp.minimum(rank, R - 1)] - spare)

    def idle(room: _Room) -> jax.Array:
        return (room.status == S.FINISHED) & (room.table.num_tokens[0] > 0)

    def retaining(room: _Room, after: jax.Array) -> jax.Array:
        """Waiting slots after rank ``after`` that hold K,V (a session's retained history)."""
        return is_waiting(room.status) & (room.table.num_tokens[0] > 0) & (position > after)

    def cached_spare(room: _Room) -> jax.Array:
        if not policy.prefix_caching:
            return jnp.int32(0)
        return prefix_cache.evictable(room.cache, room.table).sum(dtype=i32)

    def can_make_room(room: _Room, after, for_running: bool) -> jax.Array:
        spare = (cached_spare(room) > 0) | idle(room).any() | retaining(room, after).any()
        return spare | (room.status == S.RUNNING).any() if for_running else spare

    def make_room(room: _Room, deficit, after, for_running: bool) -> _Room:
        """Give way, the first that applies: the ``deficit`` least recently used cached
        blocks nobody uses; the least recently used idle session; the K,V retained by the last
        waiting slot in order after rank ``after``; for running slots only, the last running
        slot in order (preempted)."""
        if policy.prefix_caching:
            def evict_cached(room):
                cache, table = prefix_cache.evict(room.cache, room.table, deficit)
                return dataclasses.replace(room, cache=cache, table=table)

            return jax.lax.cond(cached_spare(room) > 0, evict_cached, functools.partial(
                free_slot, after=after, for_running=for_running), room)
        return free_slot(room, after, for_running)

    def free_slot(room: _Room, after, for_running: bool) -> _Room:
        has_idle, waiting = idle(room).any(), retaining(room, after)
        lru = jnp.argmin(jnp.where(idle(room), r.last_used, jnp.inf))
        last_waiting = jnp.argmax(jnp.where(waiting, position, -1))
        last_running = jnp.argmax(jnp.where(room.status == S.RUNNING, position, -1))
        victim = jnp.where(has_idle, lru, jnp.where(waiting.any(), last_waiting, last_running))
        preempt = ~has_idle  # a waiting or running slot loses its K,V
        tokens = room.table.num_tokens[:, victim]  # [G]
        backed = r.host_tokens[victim] >= tokens[0]  # the host holds all it has on the device
        # Swapping copies K,V to the host; with nothing to copy it is restorable at once.
        swap = preempt & (policy.preemption == "swap") & ~backed
        # An idle session whose K,V the host tier holds keeps its slot: its next turn restores.
        idle_status = jnp.where(r.host_tokens[victim] > 0, S.FINISHED, S.EMPTY)
        status = jnp.where(preempt, jnp.where(swap, S.OFFLOADED, S.PREEMPTED), idle_status)
        # If the host holds all it has on the device, it loses its upper-most group only.
        G = tokens.shape[0]
        top = G - 1 - jnp.argmax(tokens[::-1] > 0)
        purge = ~preempt & backed
        groups = jnp.where(purge, jnp.arange(G) == top, True)
        return dataclasses.replace(
            room, table=bt.free(room.table, victim[None], groups),
            status=room.status.at[victim].set(status),
            grant=room.grant.at[victim].set(jnp.where(preempt, 0, room.grant[victim])),
            evicted=room.evicted.at[victim].set(room.evicted[victim] | ~preempt),
            preempted=room.preempted.at[victim].set(room.preempted[victim] | preempt))

    def settle(room: _Room) -> _Room:
        """Budget for every slot not denied or preempted; room for the running ones; waiting
        ones that do not fit are denied. Denials and preemptions hand their budget back in the
        next round."""
        excluded = room.denied | room.preempted
        got = _budget(jnp.where(excluded, 0, want)[order], limits, policy.chunked_prefill)
        before = room.preempted
        room = dataclasses.replace(room, grant=jnp.zeros(R, i32).at[order].set(got))
        room, _ = _until_room(room, lambda room: (jnp.int32(-1), running_deficit(room)),
                           functools.partial(can_make_room, for_running=True),
                           functools.partial(make_room, for_running=True))
        room, misfit = _until_room(room, first_misfit,
                                   functools.partial(can_make_room, for_running=False),
                                   functools.partial(make_room, for_running=False))
        # FCFS: the first waiting slot that does not fit stops every waiting slot after it.
        denied = is_waiting(room.status) & (position >= misfit)
        new = (denied & ~room.denied) | (room.preempted & ~before)
        return dataclasses.replace(room, grant=jnp.where(denied, 0, room.grant),
                                   denied=room.denied | denied, changed=new.any())

    no = jnp.zeros(R, bool)
    room = jax.lax.while_loop(lambda room: room.changed, settle, _Room(
        table, state.cache, r.status, jnp.zeros(R, i32), evicted, no, no, jnp.bool_(True)))
    table, status, grant, evicted, preempted = (room.table, room.status, room.grant,
                                                room.evicted, room.preempted)
    restores = restorable & (grant > 0)  # victims are never scheduled: their cache is unchanged
    if not policy.layerwise_loading:  # the copy comes first: a later step computes
        grant = jnp.where(restores, 0, grant)
    scheduled = grant > 0
    reserved = grant + jnp.where(restores, from_host, 0)  # i32[G, R]
    # Scheduled slots in order, then slots restoring only (they reserve blocks too), then others:
    # distinct keys ``group * R + position``, whose order gives positions in batch order.
    batch_order = order[jnp.sort(jnp.select([scheduled, restores], [position, R + position],
                                            2 * R + position)) % R]
    table = _reserve(table, reserved, batch_order, limits, policy.uses_host)
    samples = scheduled & (cached + grant == known)
    requests = dataclasses.replace(
        r,
        status=jnp.where(scheduled, S.RUNNING, jnp.where(restores, S.LOADING, status)),
        last_used=jnp.where(scheduled, jnp.asarray(now, f32), r.last_used),
        computed=r.computed + jnp.where(scheduled, _overlap(cached, grant, r.prompt_len), 0),
        recomputed_history=r.recomputed_history + jnp.where(
            scheduled, _overlap(cached, grant, r.history_len), 0),
        preemptions=r.preemptions + preempted,
    )
    plan = StepPlan(
        query_lens=grant,
        order=jnp.where(scheduled[batch_order], batch_order, R).astype(i32),
        num_seqs=scheduled.sum(dtype=i32),
        num_tokens=grant.sum(dtype=i32),
        samples=samples,
        preempted=preempted,
        offloads=(status == S.OFFLOADED) & (r.status != S.OFFLOADED),
        restores=restores,
        restore_groups=jnp.where(restores, missing.sum(axis=0, dtype=i32), 0),
        evicted=evicted,
        decode_only=scheduled.any() & jnp.all(grant <= 1),
    )
    return S.SchedulerState(requests, table, room.cache), plan


@functools.partial(jax.jit, donate_argnames="state", static_argnames="policy")
def commit(state: S.SchedulerState, plan: StepPlan, stop: jax.Array, now, *, policy: Policy,
           seq_slots: jax.Array | None = None, sequences: prefix_cache.Prefixes | None = None):
    """Count the tokens the step sampled; finish requests that hit a stop flag (bool[R], set by
    the executor for its sampled tokens) or ``max_new_tokens``; keep or drop their K,V as the
    retention policy says. Returns the state and the slots that finished (bool[R]).

    With ``policy.prefix_caching``, the full blocks of finishing requests among ``seq_slots``
    (i32[B]) enter the prefix cache as ``sequences`` (B rows) names them.
    """
    r, table, cache = state.requests, state.blocks, state.cache
    generated = r.num_generated + plan.samples
    finished = plan.samples & (stop | (generated >= r.max_new_tokens))
    if policy.prefix_caching and sequences is not None:
        rows = table.block_ids[0].at[seq_slots].get(mode="fill", fill_value=0)
        full = table.num_tokens[0].at[seq_slots].get(mode="fill", fill_value=0) // (
            table.block_size)
        valid = finished.at[seq_slots].get(mode="fill", fill_value=False)[:, None] & (
            jnp.arange(rows.shape[1]) < full[:, None])
        cache, table = jax.lax.cond(
            valid.any(), lambda: prefix_cache.register(cache, table, sequences, rows, valid, now),
            lambda: (cache, table))
    keep = finished & (r.session_id != S.NO_SESSION) & (policy.retention != "drop")
    dropped = finished & ~keep
    table = bt.free_where(table, dropped)
    requests = dataclasses.replace(
        r,
        status=jnp.where(dropped, S.EMPTY, jnp.where(finished, S.FINISHED, r.status)),
        num_generated=generated,
        expiry=jnp.where(keep, jnp.asarray(now, f32) + policy.retention_s, r.expiry),
        last_used=jnp.where(finished, jnp.asarray(now, f32), r.last_used),
    )
    return S.SchedulerState(requests, table, cache), finished
