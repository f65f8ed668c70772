"""Transitions driven by the host tier: the executor reports what its copies did.

The scheduler decides which slots' K,V leave the device (``StepPlan.offloads``) and which come
back (``StepPlan.restores``); the copies themselves are asynchronous, and the executor reports
their outcome here, each call for a batch of slots (``i32[K]``; entries out of range are
padding):

- ``stored``: the host tier now holds the first ``tokens`` tokens of each slot's sequence; a
  slot preempted by swap (``OFFLOADED``) becomes restorable.
- ``loaded``: a ``LOADING`` slot's K,V is back in its blocks; it resumes from them. A
  ``PREFETCHING`` slot becomes an idle session resident on the device.
- ``lost``: the host tier no longer holds the slot's K,V (evicted, unreadable, or never
  stored for want of room): the slot falls back to recomputing. A ``LOADING`` or
  ``PREFETCHING`` slot gives its reserved blocks back, and so does a slot that a purge left
  with its lower layer groups only (useless without the others); an idle session with nothing
  left on the device empties its slot.

Two more prepare a session's next request before it arrives (SYMPHONY's node manager):

- ``adopt``: empty slots become idle sessions holding nothing yet, whose K,V is on its way to
  the host tier (a migration from another node; ``stored`` follows, or ``lost``).
- ``prefetch``: idle sessions missing layer groups that the host tier holds (all of them, or
  the upper ones a purge took) take free blocks for them, lower groups first, never evicting
  anything; ``PREFETCHING`` while the executor copies them in.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from symphony_jax.memory import block_table as bt
from symphony_jax.scheduler import state as S


def _hit(state: S.SchedulerState, slots: jax.Array) -> jax.Array:
    R = state.num_slots
    slots = jnp.where((slots >= 0) & (slots < R), slots, R)
    return jnp.zeros(R, bool).at[slots].set(True, mode="drop")


@functools.partial(jax.jit, donate_argnames="state")
def stored(state: S.SchedulerState, slots: jax.Array, tokens: jax.Array) -> S.SchedulerState:
    """The host tier holds ``tokens`` (i32[K]) tokens of each of ``slots``."""
    R, r = state.num_slots, state.requests
    slots = jnp.where((slots >= 0) & (slots < R), slots, R)
    hit = _hit(state, slots)
    return dataclasses.replace(state, requests=dataclasses.replace(
        r, host_tokens=r.host_tokens.at[slots].set(tokens, mode="drop"),
        status=jnp.where(hit & (r.status == S.OFFLOADED), S.PREEMPTED, r.status)))


@functools.partial(jax.jit, donate_argnames="state")
def loaded(state: S.SchedulerState, slots: jax.Array) -> S.SchedulerState:
    """The K,V of ``LOADING`` or ``PREFETCHING`` ``slots`` is in their blocks."""
    r, hit = state.requests, _hit(state, slots)
    status = jnp.select([hit & (r.status == S.LOADING), hit & (r.status == S.PREFETCHING)],
                        [S.PREEMPTED, S.FINISHED], r.status)
    return dataclasses.replace(state, requests=dataclasses.replace(r, status=status))


@functools.partial(jax.jit, donate_argnames="state")
def lost(state: S.SchedulerState, slots: jax.Array) -> S.SchedulerState:
    """The host tier no longer holds the K,V of ``slots``."""
    r, table = state.requests, state.blocks
    hit = _hit(state, slots)
    loading = hit & (r.status == S.LOADING)
    prefetching = hit & (r.status == S.PREFETCHING)
    partial = hit & (table.num_tokens[0] > 0) & (table.num_tokens[-1] == 0)
    table = bt.free_where(table, loading | prefetching | partial)
    empty = hit & ((r.status == S.FINISHED) | prefetching) & (table.num_tokens[0] == 0)
    status = jnp.select([loading | (hit & (r.status == S.OFFLOADED)), empty],
                        [S.PREEMPTED, S.EMPTY], r.status)
    return dataclasses.replace(state, blocks=table, requests=dataclasses.replace(
        r, status=status, host_tokens=jnp.where(hit, 0, r.host_tokens)))


@functools.partial(jax.jit, donate_argnames="state")
def adopt(state: S.SchedulerState, slots: jax.Array, session_ids: jax.Array,
          now) -> S.SchedulerState:
    """``EMPTY`` ``slots`` (i32[K]) become idle sessions ``session_ids`` (i32[K]) with no K,V
    yet: it is on its way to the host tier."""
    r = state.requests
    slots = jnp.where((slots >= 0) & (slots < state.num_slots), slots, state.num_slots)
    empty = r.status.at[slots].get(mode="fill", fill_value=S.REJECTED) == S.EMPTY
    slots = jnp.where(empty, slots, state.num_slots)
    put = lambda column, value: column.at[slots].set(value, mode="drop")
    return dataclasses.replace(state, requests=dataclasses.replace(
        r, status=put(r.status, S.FINISHED), session_id=put(r.session_id, session_ids),
        request_id=put(r.request_id, -1), last_used=put(r.last_used, jnp.asarray(now, jnp.float32)),
        expiry=put(r.expiry, S.NEVER), host_tokens=put(r.host_tokens, 0)))


@functools.partial(jax.jit, donate_argnames="state")
def prefetch(state: S.SchedulerState, slots: jax.Array) -> tuple[S.SchedulerState, jax.Array]:
    """Idle ``slots`` (i32[K]) whose device misses layer groups of the ``host_tokens`` the host
    tier holds take free blocks for them, greedily and lower layers first (SYMPHONY's fill):
    every slot's group g, in order while they fit, before any slot's group g + 1; a slot stops
    at its first group that does not fit. Slots given any become ``PREFETCHING``. Returns the
    state and the groups each of ``slots`` was given (bool[G, K])."""
    r, table, R = state.requests, state.blocks, state.num_slots
    slots = jnp.where((slots >= 0) & (slots < R), slots, R)
    get = lambda column, fill: column.at[slots].get(mode="fill", fill_value=fill)
    host = get(r.host_tokens, 0)
    tokens = table.num_tokens.at[:, slots].get(mode="fill", fill_value=1)  # [G, K]
    # Nothing on the device, or the lower groups a purge left (holding what the host holds).
    going = ((get(r.status, S.EMPTY) == S.FINISHED) & (host > 0)
             & ((tokens[0] == 0) | (tokens[0] == host)))
    given, groups = [], jnp.arange(table.num_groups)
    for g in range(table.num_groups):
        want = going & (tokens[g] == 0)
        table, ok = bt.reserve(table, jnp.where(want, slots, R), jnp.where(want, host, 0),
                               groups == g)
        given.append(want & ok[g])
        going &= given[-1] | (tokens[g] > 0)
    given = jnp.stack(given)
    granted = given.any(axis=0)
    status = r.status.at[jnp.where(granted, slots, R)].set(S.PREFETCHING, mode="drop")
    return dataclasses.replace(state, blocks=table, requests=dataclasses.replace(
        r, status=status)), given
