"""Admission: arriving requests into slots.

A request of a session whose slot is idle (finished, K,V retained on the device or the host
tier) takes that slot, and its prompt's cached prefix is served from it. Any other request takes an empty slot, or else the slot
of the least recently used idle session, whose K,V is dropped. A request is rejected, with a
reason, if it is malformed, too long for the model, too large for the whole pool, finds no slot,
or arrives while its session's previous request is still active.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from symphony_jax.config import SchedulerConfig
from symphony_jax.memory import block_table as bt
from symphony_jax.scheduler import prefix_cache
from symphony_jax.scheduler import state as S
from symphony_jax.scheduler.policy import Policy

i32 = jnp.int32
# A prefetching session counts as active: its request waits (the engine holds it back) until the
# copy into its blocks is complete.
ACTIVE = (S.WAITING, S.RUNNING, S.PREEMPTED, S.LOADING, S.OFFLOADED, S.PREFETCHING)
IDLE = (S.FINISHED,)


def _is(status: jax.Array, codes: tuple[int, ...]) -> jax.Array:
    return functools.reduce(jnp.logical_or, [status == c for c in codes])


def _first_of_session(session_id: jax.Array, valid: jax.Array) -> jax.Array:
    """bool[N]: no earlier valid request in the batch has the same session."""
    n = session_id.shape[0]
    earlier = jnp.arange(n)[None, :] < jnp.arange(n)[:, None]
    same = (session_id[:, None] == session_id[None, :]) & valid[None, :] & earlier
    return ~same.any(axis=1)


@functools.partial(jax.jit, donate_argnames="state", static_argnames=("limits", "policy"))
def admit(state: S.SchedulerState, new: S.NewRequests, *, limits: SchedulerConfig,
          policy: Policy = Policy(), prompts: prefix_cache.Prefixes | None = None):
    """Admit ``new`` requests in batch order. Returns the state, each request's slot (``R``
    where none) and its reason (``state.ADMITTED`` or why not).

    With ``policy.prefix_caching``, ``prompts`` (the prompts' blocks as the prefix cache names
    them, ``max_blocks_per_seq`` each; keys zeros past a prompt's full blocks) let a request
    starting from nothing take the longest cached prefix of its prompt, all but its last token.
    """
    if policy.prefix_caching and state.blocks.num_groups != 1:
        raise ValueError("admit: prefix caching needs a block table with one layer group, not "
                         f"{state.blocks.num_groups}")
    r, table, cache = state.requests, state.blocks, state.cache
    R, N = state.num_slots, new.request_id.shape[0]
    present = new.request_id >= 0
    malformed = ((new.prompt_len < 1) | (new.max_new_tokens < 1) | (new.history_len < 0) |
                 (new.history_len >= new.prompt_len))
    # Compared without adding the two: their int32 sum could wrap around.
    too_long = ((new.prompt_len > limits.max_model_len)
                | (new.max_new_tokens > limits.max_model_len - new.prompt_len))
    total = jnp.where(too_long, 0, new.prompt_len + new.max_new_tokens)
    too_big = -(-total // table.block_size) * table.num_groups > table.num_blocks - 1
    reason = jnp.select([~present | malformed, too_long, too_big],
                        [S.INVALID, S.TOO_LONG, S.NO_MEMORY], S.ADMITTED).astype(i32)

    # The slot already holding each request's session, if any.
    with_session = (reason == S.ADMITTED) & (new.session_id != S.NO_SESSION)
    holds = (r.session_id[None, :] == new.session_id[:, None]) & (r.status != S.EMPTY)[None, :]
    own = jnp.where(with_session & holds.any(axis=1), jnp.argmax(holds, axis=1), R)
    own_status = r.status.at[own].get(mode="fill", fill_value=S.EMPTY)
    busy = (own < R) & _is(own_status, ACTIVE)
    busy |= with_session & ~_first_of_session(new.session_id, with_session)
    reason = jnp.where((reason == S.ADMITTED) & busy, S.SESSION_BUSY, reason)
    reuse = (reason == S.ADMITTED) & (own < R)

    # Fresh slots: empty ones first, then idle sessions least recently used first.
    needs_slot = (reason == S.ADMITTED) & ~reuse
    # (Several requests may name one slot: scatter only the chosen ones, never a mask.)
    mark = lambda chosen, where_: jnp.zeros(R, bool).at[jnp.where(chosen, where_, R)].set(
        True, mode="drop")
    reused = mark(reuse, own)
    key = jnp.where(r.status == S.EMPTY, -jnp.inf,
                    jnp.where(_is(r.status, IDLE) & ~reused, r.last_used, jnp.inf))
    candidates = jnp.argsort(key)
    rank = jnp.cumsum(needs_slot) - 1
    fresh = candidates[jnp.clip(rank, 0, R - 1)]
    got = needs_slot & (rank < R) & (key[fresh] < jnp.inf)
    reason = jnp.where(needs_slot & ~got, S.NO_SLOT, reason)
    slot = jnp.where(reuse, own, jnp.where(got, fresh, R))

    # Evicted idle sessions start from nothing; so does a retained K,V whose retention expired
    # before the request arrived, or that covers the whole new prompt (its last token must be
    # computed to sample from it: the prompt does not continue the session).
    cached = state.cached_tokens
    retained = cached.at[own].get(mode="fill", fill_value=0)
    expired = r.expiry.at[own].get(mode="fill", fill_value=jnp.inf) <= new.arrival
    covers = (retained >= new.prompt_len) | (
        r.host_tokens.at[own].get(mode="fill", fill_value=0) >= new.prompt_len)
    stale = mark(got, fresh) | mark(reuse & (covers | expired), own)
    table = bt.free_where(table, stale)
    if policy.prefix_caching and prompts is not None:
        starts_empty = (reason == S.ADMITTED) & (table.num_tokens[0].at[slot].get(
            mode="fill", fill_value=1) == 0)
        limit = jnp.where(starts_empty, (new.prompt_len - 1) // table.block_size, 0)
        blocks, counts = prefix_cache.match(cache, prompts, limit)
        table, _ = bt.adopt(table, jnp.where(counts > 0, slot, R), blocks, counts)
        cache = prefix_cache.touch(cache, blocks, new.arrival[:, None])
    cached = table.num_tokens[0]

    write = lambda column, values: column.at[slot].set(values, mode="drop")
    requests = dataclasses.replace(
        r,
        status=write(r.status, jnp.full(N, S.WAITING, i32)),
        session_id=write(r.session_id, new.session_id),
        request_id=write(r.request_id, new.request_id),
        prompt_len=write(r.prompt_len, new.prompt_len),
        history_len=write(r.history_len, new.history_len),
        max_new_tokens=write(r.max_new_tokens, new.max_new_tokens),
        num_generated=write(r.num_generated, jnp.zeros(N, i32)),
        priority=write(r.priority, new.priority),
        arrival=write(r.arrival, new.arrival),
        expiry=write(r.expiry, jnp.full(N, S.NEVER)),
        cached_at_admission=write(r.cached_at_admission,
                                  cached.at[slot].get(mode="fill", fill_value=0)),
        computed=write(r.computed, jnp.zeros(N, i32)),
        recomputed_history=write(r.recomputed_history, jnp.zeros(N, i32)),
        preemptions=write(r.preemptions, jnp.zeros(N, i32)),
        host_tokens=jnp.where(stale, 0, r.host_tokens),
    )
    return S.SchedulerState(requests, table, cache), slot.astype(i32), reason


def slot_to_adopt(requests: S.Requests, free: np.ndarray) -> tuple[int, bool] | None:
    """The slot a session migrating in takes, chosen on the host like a fresh slot at
    admission: an empty one, else the least recently used idle session's. Returns the slot and
    whether an idle session holds it (the caller evicts it), or None. ``free``: bool[R], the
    slots the caller has no other use for."""
    status, last_used = jax.device_get((requests.status, requests.last_used))
    key = np.where(status == S.EMPTY, -np.inf,
                   np.where(np.isin(status, IDLE), last_used, np.inf))
    key = np.where(free, key, np.inf)
    slot = int(np.argmin(key))
    return (slot, bool(status[slot] != S.EMPTY)) if key[slot] < np.inf else None


@functools.partial(jax.jit, donate_argnames="state")
def abort(state: S.SchedulerState, slots: jax.Array) -> S.SchedulerState:
    """End the requests in ``slots`` (i32[K]; out of range: padding) now: their K,V is freed and
    the slots become empty, whatever their status."""
    R = state.num_slots
    slots = jnp.where((slots >= 0) & (slots < R), slots, R)
    hit = jnp.zeros(R, bool).at[slots].set(True, mode="drop")
    r = state.requests
    return S.SchedulerState(dataclasses.replace(r, status=jnp.where(hit, S.EMPTY, r.status),
                                                host_tokens=jnp.where(hit, 0, r.host_tokens)),
                            bt.free(state.blocks, slots), state.cache)
