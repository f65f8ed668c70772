"""Transitions driven by the host tier: the executor reports what its copies did.

The scheduler decides which slots' K,V leave the device (``StepPlan.offloads``) and which come
back (``StepPlan.restores``); the copies themselves are asynchronous, and the executor reports
their outcome here, each call for a batch of slots (``i32[K]``; entries out of range are
padding):

- ``stored``: the host tier now holds the first ``tokens`` tokens of each slot's sequence; a
  slot preempted by swap (``OFFLOADED``) becomes restorable.
- ``loaded``: a ``LOADING`` slot's K,V is back in its blocks; it resumes from them.
- ``lost``: the host tier no longer holds the slot's K,V (evicted, unreadable, or never
  stored for want of room): the slot falls back to recomputing. A ``LOADING`` slot gives its
  reserved blocks back; an idle session with nothing left on the device empties its slot.
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
    """The K,V of ``LOADING`` ``slots`` is in their blocks."""
    r = state.requests
    done = _hit(state, slots) & (r.status == S.LOADING)
    return dataclasses.replace(state, requests=dataclasses.replace(
        r, status=jnp.where(done, S.PREEMPTED, r.status)))


@functools.partial(jax.jit, donate_argnames="state")
def lost(state: S.SchedulerState, slots: jax.Array) -> S.SchedulerState:
    """The host tier no longer holds the K,V of ``slots``."""
    r, table = state.requests, state.blocks
    hit = _hit(state, slots)
    loading = hit & (r.status == S.LOADING)
    table = bt.free_where(table, loading)
    empty = hit & (r.status == S.FINISHED) & (table.num_tokens[0] == 0)
    status = jnp.select([loading | (hit & (r.status == S.OFFLOADED)), empty],
                        [S.PREEMPTED, S.EMPTY], r.status)
    return dataclasses.replace(state, blocks=table, requests=dataclasses.replace(
        r, status=status, host_tokens=jnp.where(hit, 0, r.host_tokens)))
