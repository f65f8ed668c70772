"""The scheduler's state: a fixed-capacity table of request slots and the block table.

A slot holds one *sequence*: a session's K,V (its history) and its current request. A request of
session s runs in s's slot, so a session that keeps its K,V between turns (retention ``keep`` or
``ttl``) serves its next turn from the same blocks; a request without a session gets a slot of
its own. Slot ``i`` of the request table is slot ``i`` of the block table, whose token count is
the number of the slot's tokens whose K,V is cached.

A request knows ``prompt_len + num_generated`` tokens (its prompt, history included, and what it
has generated). Each step it computes some of those not yet cached (a prefill chunk, or the one
token sampled last step); when a step reaches the last known token, a new token is sampled.
Prefill and decode are the same rule, and recompute-preemption is just forgetting the cache.

``host_tokens`` counts the slot's tokens whose K,V the node's host tier holds (copies complete).
A waiting slot with nothing cached on the device and ``host_tokens > 0`` is *restorable*: when it
is scheduled its blocks are reserved for those tokens as well and the executor copies them back
(``scheduler.tiers``), so they are not recomputed. An idle session's slot may also be filled
ahead of its next request: migrated in from another node (``tiers.adopt``), then copied from
the host tier to free blocks (``tiers.prefetch``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from symphony_jax.config import EngineConfig
from symphony_jax.memory import block_table as bt
from symphony_jax.scheduler import prefix_cache

i32, f32 = jnp.int32, jnp.float32

# Slot status.
EMPTY = 0  # free slot
WAITING = 1  # admitted, not running yet
RUNNING = 2  # computing its prompt or generating
PREEMPTED = 3  # lost its K,V to make room (running, or waiting with a retained K,V)
LOADING = 4  # its K,V coming back from the host tier into blocks reserved for it
OFFLOADED = 5  # preempted by swap: its K,V on the way to the host tier, resumable once stored
FINISHED = 6  # request done; a retained session's K,V stays until evicted
REJECTED = 7  # could not be admitted (see the reasons below)
PREFETCHING = 8  # an idle session's K,V coming back from the host tier before its next request
STATUS_NAMES = ("empty", "waiting", "running", "preempted", "loading", "offloaded", "finished",
                "rejected", "prefetching")

# Why a request was not admitted (0: admitted).
ADMITTED = 0
TOO_LONG = 1  # prompt plus max_new_tokens exceeds max_model_len
NO_MEMORY = 2  # its prompt needs more blocks than the whole pool has
NO_SLOT = 3  # every slot is busy with an active request
SESSION_BUSY = 4  # its session's previous request has not finished
INVALID = 5  # malformed: empty prompt, max_new_tokens < 1, history not shorter than prompt
REASONS = ("admitted", "prompt plus max_new_tokens exceeds max_model_len",
           "prompt needs more blocks than the pool has", "no free slot",
           "the session's previous request is still running",
           "invalid request (empty prompt, max_new_tokens < 1, or history not shorter than prompt)")

NO_SESSION = -1
NEVER = np.float32(np.inf)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Requests:
    """Per-slot request fields (R slots)."""

    status: jax.Array  # i32[R]
    session_id: jax.Array  # i32[R]  NO_SESSION for a request without a session
    request_id: jax.Array  # i32[R]  the current request
    prompt_len: jax.Array  # i32[R]  tokens of its prompt, history included
    history_len: jax.Array  # i32[R] of which K,V computed before (earlier turns; not the last
    #                                   token sampled, whose K,V never is): redundancy counts
    max_new_tokens: jax.Array  # i32[R]
    num_generated: jax.Array  # i32[R]  tokens sampled so far
    priority: jax.Array  # i32[R]  lower runs first (policy "priority")
    arrival: jax.Array  # f32[R]   when the request arrived (s)
    last_used: jax.Array  # f32[R]  when the slot last ran (LRU of idle sessions)
    expiry: jax.Array  # f32[R]     a finished slot's K,V is kept until then
    cached_at_admission: jax.Array  # i32[R] prompt tokens already cached when admitted
    computed: jax.Array  # i32[R]   prompt tokens computed for this request (recomputation too)
    recomputed_history: jax.Array  # i32[R] of which history tokens (positions < history_len)
    preemptions: jax.Array  # i32[R]  times this request lost its K,V
    host_tokens: jax.Array  # i32[R]  of its sequence's tokens, those whose K,V the host tier
    #                                   holds (0: none)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SchedulerState:
    requests: Requests
    blocks: bt.BlockTable
    cache: prefix_cache.PrefixCache  # used by the policy ``prefix_caching``

    @property
    def num_slots(self) -> int:
        return self.requests.status.shape[-1]

    @property
    def cached_tokens(self) -> jax.Array:
        """i32[R]: tokens of each slot with cached K,V (group 0: running sequences are resident
        in every layer group)."""
        return self.blocks.num_tokens[..., 0, :]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NewRequests:
    """A batch of arriving requests (N, padded: ``request_id < 0`` is padding); numpy arrays
    from ``new_requests``, passed to jitted transitions as they are."""

    request_id: jax.Array  # i32[N]
    session_id: jax.Array  # i32[N]  NO_SESSION: none
    prompt_len: jax.Array  # i32[N]  history + new input
    history_len: jax.Array  # i32[N]  prompt tokens whose K,V was computed before
    max_new_tokens: jax.Array  # i32[N]
    priority: jax.Array  # i32[N]  lower runs first (any integer)
    arrival: jax.Array  # f32[N]


def new_requests(request_id, prompt_len, max_new_tokens, *, session_id=None, history_len=None,
                 priority=None, arrival=None, size: int | None = None) -> NewRequests:
    """A padded ``NewRequests`` batch of ``size`` (default: as many as given) from sequences,
    as numpy arrays (a jitted transition takes them in one transfer each)."""
    n = len(request_id)
    size = n if size is None else size
    if size < n:
        raise ValueError(f"new_requests: {n} requests do not fit a batch of size={size}")
    def column(values, default, dtype):
        out = np.full(size, default, dtype)
        if values is not None:
            out[:n] = values
        return out

    return NewRequests(
        request_id=column(request_id, -1, np.int32),
        session_id=column(session_id, NO_SESSION, np.int32),
        prompt_len=column(prompt_len, 0, np.int32),
        history_len=column(history_len, 0, np.int32),
        max_new_tokens=column(max_new_tokens, 0, np.int32),
        priority=column(priority, 0, np.int32),
        arrival=column(arrival, 0.0, np.float32),
    )


def init(config: EngineConfig, content_width: int = 0) -> SchedulerState:
    """An empty scheduler: every slot EMPTY, every block free. ``content_width``: what the
    prefix cache verifies a hit against, per block (the engine: its token ids)."""
    R = config.scheduler.slots
    zeros = lambda dtype=np.int32: jnp.zeros(R, dtype)
    return SchedulerState(
        requests=Requests(
            status=zeros(), session_id=jnp.full(R, NO_SESSION, i32), request_id=jnp.full(R, -1, i32),
            prompt_len=zeros(), history_len=zeros(), max_new_tokens=zeros(),
            num_generated=zeros(), priority=zeros(), arrival=zeros(np.float32),
            last_used=zeros(np.float32), expiry=zeros(np.float32),
            cached_at_admission=zeros(), computed=zeros(), recomputed_history=zeros(),
            preemptions=zeros(), host_tokens=zeros()),
        blocks=bt.from_config(config),
        cache=prefix_cache.create(config.cache.num_device_blocks, content_width),
    )
