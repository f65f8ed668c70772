"""A simulated node: the real scheduler state machine, a cost model instead of the model.

The node keeps the engine's ``SchedulerState`` and drives it with the same jitted transitions
(``admission.admit``, ``step.schedule``, ``step.commit``, ``tiers.*``); only the forward pass is
replaced by ``cost.step_time`` and sampling by the workload's output lengths (a request
generates exactly ``max_new_tokens``); the engine's host work to take a request in and its delay
in reading a step's tokens are the cost model's ``admission_s`` and ``report_s``. ``advance``
runs steps back to back inside one jitted loop, each taking the cost model's time, until a
request finishes, the horizon passes, or a step copies K,V to or from the host tier (the node
then starts those copies as flows on its links). Steps that only decode are known in advance
(one token per running request), so a run of them is taken at once: their blocks reserved
together, their times from ``cost.run_times``. The same forecast, made after a run, says until
when the node would report nothing if left alone (``Stretch.quiet``): the simulator lets events
elsewhere pass it by.

The host tier mirrors the engine's (``engine.host_kv``) at block granularity: a ``HostTier`` of
byte-less entries, copies as flows on the node's PCIe link. Simplifications: a turn's K,V
crosses the link when the turn ends (the engine copies each block as it fills), and the host
holds the turn's full blocks from then on, as in the engine (a session purged while the copy is
in flight recomputes only its partial last block); a sequence preempted by swap copies all its
blocks not yet on the host, where the engine under write-back has all but the partial one there
already; a layer-wise restore makes its step last until its copy is in (the copy overlapping
the step's compute). A disk tier (``disk_bytes``) keeps the entries the host tier evicts, by
session, least recently saved first out; the simulator reads them back (``Simulator._migrate``).

Prefix caching keys blocks by (session, block index): a session's token stream only grows, so
block ``i`` of a session has the same contents in every turn, and sessions share nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from symphony_jax.config import EngineConfig
from symphony_jax.memory import block_table as bt
from symphony_jax.memory import kv_cache
from symphony_jax.memory.host_tier import HostTier, HostTierFull
from symphony_jax.scheduler import admission, prefix_cache, tiers
from symphony_jax.scheduler import state as S
from symphony_jax.scheduler import step as scheduler_step
from symphony_jax.scheduler.batch import padded
from symphony_jax.scheduler.policy import Policy

i32, f32, u32 = jnp.int32, jnp.float32, jnp.uint32
ADMIT_BATCH = 16  # requests admitted per call (one compiled shape)
STRETCH_STEPS = 512  # most steps one ``advance`` call runs
DECODE_RUN = 64  # most steady decode steps ``advance`` takes at once


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Stretch:
    """What ``advance`` did (R slots). Times are seconds after its ``start``."""

    elapsed: jax.Array  # f32[]     time of the steps it ran
    steps: jax.Array  # i32[]       steps it ran
    rounds: jax.Array  # i32[]      of which, taken one at a time or as a steady run
    last_start: jax.Array  # f32[]  when its last step started
    first_token: jax.Array  # f32[R] when each slot sampled its request's first token; inf
    finished: jax.Array  # bool[R]  requests that finished (at ``elapsed``)
    copies: jax.Array  # bool[]     its last step copies K,V (to or from the host tier)
    idle: jax.Array  # bool[]       its last step ran nothing: wait for an event
    offloads: jax.Array  # bool[R]  of the last step: slots swapped out
    restore_groups: jax.Array  # i32[R]  and the layer groups each restored slot brings back
    #                                    (the upper ones; 0: not restored)
    cached_before: jax.Array  # i32[R] each slot's cached tokens before the last step
    query_lens: jax.Array  # i32[R]  and the tokens each computed in it
    # After the stretch (read with it):
    free_blocks: jax.Array  # i32[]
    quiet: jax.Array  # f32[]        time until which, left alone, it only decodes steadily,
    #                                reporting nothing (``elapsed``: no such forecast)
    cached: jax.Array  # i32[R]      each slot's cached tokens
    computed: jax.Array  # i32[R]    prompt tokens its request computed
    recomputed: jax.Array  # i32[R]  of which history tokens
    host_tokens: jax.Array  # i32[R] tokens the host tier holds for it

    @classmethod
    def empty(cls, R: int) -> Stretch:
        """Nothing run yet (numpy arrays)."""
        zero, no = np.zeros(R, np.int32), np.zeros(R, bool)
        return cls(np.float32(0), np.int32(0), np.int32(0), np.float32(0),
                   np.full(R, np.inf, np.float32), no, np.bool_(False), np.bool_(False), no,
                   zero, zero, zero, np.int32(0), np.float32(0), zero, zero, zero, zero)

    def pack(self) -> tuple[jax.Array, jax.Array]:
        """The fields as one f32 and one i32 vector: two reads to the host, not 17."""
        leaves = jax.tree.leaves(self)
        return (jnp.concatenate([jnp.ravel(x) for x in leaves if x.dtype == f32]),
                jnp.concatenate([jnp.ravel(x).astype(i32) for x in leaves if x.dtype != f32]))

    @classmethod
    def unpack(cls, R: int, floats: np.ndarray, ints: np.ndarray) -> Stretch:
        leaves, tree = _layout(R)
        return jax.tree.unflatten(tree, [
            (floats if is_float else ints)[start:stop].reshape(shape).astype(dtype, copy=False)
            for is_float, start, stop, shape, dtype in leaves])


@functools.lru_cache
def _layout(R: int):
    """Where ``Stretch.pack`` puts each field of an R-slot stretch: (in the floats, start,
    stop, shape, dtype) per leaf, and the tree."""
    leaves, tree = jax.tree.flatten(Stretch.empty(R))
    taken, layout = {True: 0, False: 0}, []
    for like in leaves:
        is_float = like.dtype == np.float32
        layout.append((is_float, taken[is_float], taken[is_float] + like.size, like.shape,
                       like.dtype))
        taken[is_float] += like.size
    return layout, tree


def prefixes(session_id: jax.Array, request_id: jax.Array, max_blocks: int) -> prefix_cache.Prefixes:
    """N sequences' blocks as the prefix cache names them: synthetic keys ``(owner + 1, block +
    1, 0, 0)``, exact, so with nothing to verify; the owner is the session (a request without
    one owns its blocks alone)."""
    owner = jnp.where(session_id != S.NO_SESSION, session_id, (1 << 30) + request_id) + 1
    blocks = jnp.arange(1, max_blocks + 1, dtype=u32)
    ids = jnp.broadcast_arrays(owner.astype(u32)[:, None], blocks[None, :])
    keys = jnp.stack([*ids, *[jnp.zeros_like(ids[0])] * (prefix_cache.KEY_WORDS - 2)], -1)
    N = session_id.shape[0]
    return prefix_cache.Prefixes(keys, jnp.zeros((N, max_blocks, 0), i32),
                                 jnp.full(N, prefix_cache.root_tag(0), u32))


def _steady(state: S.SchedulerState, limits) -> jax.Array:
    """Whether the next step only decodes: every active slot is running, has sampled its first
    token and has one token to compute, and a step's limits hold them all."""
    r = state.requests
    running = r.status == S.RUNNING
    decoding = (r.prompt_len + r.num_generated - state.cached_tokens == 1) & (r.num_generated > 0)
    inert = (r.status == S.EMPTY) | (r.status == S.FINISHED)
    n = running.sum()
    return ((inert | (running & decoding)).all() & (n > 0) & (n <= limits.max_num_seqs)
            & (n <= limits.max_num_batched_tokens))


def _decode_run(state: S.SchedulerState, start, elapsed, steps, horizon, *, limits, cost,
                max_steps, run: int) -> tuple[jax.Array, jax.Array]:
    """How many of the next ``run`` steps stay steady (``_steady``; 0 if the state is not)
    and start in time, and those steps' times (f32[run]). A steady step decodes one token per
    running slot and nothing else, so the steps are known in advance; the run ends before a
    step whose blocks are not free (it would preempt), a step that finishes a request, a step
    that would expire a retained K,V, or a step that starts at or after ``horizon``."""
    r, table = state.requests, state.blocks
    running = r.status == S.RUNNING
    ahead = jnp.arange(run, dtype=i32)  # steps from now
    dt = cost.run_times(running.astype(i32), state.cached_tokens, run)
    begins = elapsed + jnp.cumsum(dt) - dt  # when each step starts, after ``start``
    new_blocks = jnp.where(running, scheduler_step.blocks_needed(
        state.cached_tokens, ahead[:, None] + 1, table.block_size), 0).sum(-1)
    left = jnp.where(running, r.max_new_tokens - r.num_generated, jnp.iinfo(i32).max).min()
    expiry = jnp.where(r.status == S.FINISHED, r.expiry, jnp.inf).min()
    step = steps + ahead
    ok = (((step == 0) | (begins < horizon)) & (step < max_steps)
          & (new_blocks * table.num_groups <= table.free_top) & (ahead + 1 < left)
          & (jnp.asarray(start, f32) + begins < expiry))
    k = jnp.where(ok.all(), run, jnp.argmin(ok)).astype(i32)
    return jnp.where(_steady(state, limits), k, 0), dt


def _when(pred: jax.Array, apply, carry):
    """``apply(carry)`` if ``pred``, else ``carry``: a loop of zero or one round rather than
    ``lax.cond``, whose branches XLA:CPU gives copies of the whole block table each time."""
    return jax.lax.while_loop(lambda c: c[0], lambda c: (jnp.bool_(False), apply(c[1])),
                              (pred, carry))[1]


@functools.partial(jax.jit, donate_argnames="state",
                   static_argnames=("limits", "policy", "cost", "max_steps", "decode_run"))
def advance(state: S.SchedulerState, start, horizon, wake_free, *, limits, policy: Policy,
            cost, max_steps: int, decode_run: int = 1):
    """Run steps from time ``start``: one, then more while less than ``horizon`` seconds have
    passed, at most ``max_steps``, stopping after a step where a request finishes, that ran
    nothing, that copies K,V (the caller starts its copies), or that leaves ``wake_free`` free
    blocks or more (the caller has a copy waiting for them). Returns the state and the
    ``Stretch``, packed.

    Steps that only decode (``_steady``) are taken up to ``decode_run`` at a time, in closed
    form: the same plans and times as one by one, with fewer scheduler calls. With
    ``decode_run`` > 1 the stretch also forecasts the steady steps that follow it (``quiet``)."""
    R = state.num_slots
    slots = jnp.arange(R, dtype=i32)
    no = jnp.zeros(R, bool)

    def step(carry):
        state, out = carry
        now = jnp.asarray(start, f32) + out.elapsed
        before = state.cached_tokens
        new, plan = scheduler_step.schedule(state, now, limits=limits, policy=policy)
        context = new.cached_tokens - plan.query_lens
        dt = jnp.where(plan.num_seqs > 0, cost.step_time(plan.query_lens, context), 0.0)
        sequences = (prefixes(new.requests.session_id, new.requests.request_id,
                              new.blocks.max_blocks_per_seq) if policy.prefix_caching else None)
        new, finished = scheduler_step.commit(new, plan, no, now + dt, policy=policy,
                                              seq_slots=slots, sequences=sequences)
        first = plan.samples & (state.requests.num_generated == 0)
        elapsed = out.elapsed + dt
        return new, dataclasses.replace(
            out, elapsed=elapsed, steps=out.steps + 1, rounds=out.rounds + 1,
            last_start=out.elapsed,
            first_token=jnp.where(first, elapsed, out.first_token), finished=finished,
            copies=plan.offloads.any() | plan.restores.any(), idle=plan.num_seqs == 0,
            offloads=plan.offloads, restore_groups=plan.restore_groups, cached_before=before,
            query_lens=plan.query_lens)

    def jump(carry, k, dt):
        """``k`` steady steps of times ``dt[:k]`` at once."""
        state, out = carry
        r = state.requests
        running = r.status == S.RUNNING
        width = min(-(-decode_run // state.blocks.block_size) + 1,
                    state.blocks.max_blocks_per_seq)
        table, _ = bt.reserve(state.blocks, jnp.where(running, slots, R),
                              jnp.where(running, k, 0), max_new_blocks=width)
        j = jnp.arange(decode_run)
        last_start = out.elapsed + jnp.where(j < k - 1, dt, 0).sum()
        elapsed = out.elapsed + jnp.where(j < k, dt, 0).sum()
        requests = dataclasses.replace(
            r, num_generated=r.num_generated + jnp.where(running, k, 0),
            last_used=jnp.where(running, jnp.asarray(start, f32) + last_start, r.last_used))
        return S.SchedulerState(requests, table, state.cache), dataclasses.replace(
            out, elapsed=elapsed, steps=out.steps + k, rounds=out.rounds + 1,
            last_start=last_start, finished=no,
            copies=jnp.bool_(False), idle=jnp.bool_(False), offloads=no,
            restore_groups=jnp.zeros(R, i32),
            cached_before=state.cached_tokens + jnp.where(running, k - 1, 0),
            query_lens=running.astype(i32))

    def body(carry):
        if decode_run <= 1:
            return step(carry)
        k, dt = _decode_run(carry[0], start, carry[1].elapsed, carry[1].steps, horizon,
                            limits=limits, cost=cost, max_steps=max_steps, run=decode_run)
        carry = _when(k > 0, functools.partial(jump, k=k, dt=dt), carry)
        return _when(k == 0, step, carry)

    def going(carry):
        state, out = carry
        return (~out.finished.any() & ~out.copies & ~out.idle & (out.steps < max_steps)
                & ((out.steps == 0) | ((out.elapsed < horizon)
                                       & (state.blocks.free_top < wake_free))))

    out = jax.tree.map(jnp.asarray, Stretch.empty(R))
    state, out = jax.lax.while_loop(going, body, (state, out))
    quiet = out.elapsed
    if decode_run > 1:  # the steady steps ahead start before the first that could report
        k, dt = _decode_run(state, start, out.elapsed, 0, jnp.inf, limits=limits, cost=cost,
                            max_steps=decode_run, run=decode_run)
        quiet += jnp.where(~out.copies & (jnp.arange(decode_run) < k), dt, 0).sum()
    r = state.requests
    return state, dataclasses.replace(
        out, free_blocks=state.blocks.free_top, quiet=quiet, cached=state.cached_tokens,
        computed=r.computed, recomputed=r.recomputed_history, host_tokens=r.host_tokens).pack()


@dataclasses.dataclass
class SimRequest:
    request_id: int
    session_id: int
    turn_index: int
    prompt_len: int  # history + new input
    history_len: int  # tokens of the session before this request
    max_new_tokens: int
    arrival_s: float
    advisory_s: float = math.nan
    node: int = -1
    slot: int = -1
    prefill_estimate: int = 0  # prompt tokens it was expected to compute (placement load)
    first_token_s: float = math.nan
    finish_s: float = math.nan
    finish_reason: str | None = None
    prefill_tokens: int = 0  # over every attempt
    recomputed_tokens: int = 0


@dataclasses.dataclass(frozen=True)
class _Blocks:
    """A host-tier entry's stand-in for ``transfer.Chunk``: blocks without bytes."""

    first_block: int
    num_blocks: int
    nbytes: int

    def is_ready(self) -> bool:
        return True


class SimNode:
    def __init__(self, index: int, config: EngineConfig, policy: Policy, cost,
                 launch: Callable[[float, tuple[str, ...], int, Callable[[float], None]], None],
                 disk_bytes: float = 0.0):
        """``launch(time, path, nbytes, on_done)`` starts a copy over links at ``time`` (this
        node's PCIe link is ``pcie<index>``, its disk ``disk<index>``); ``on_done(end time)``
        follows. ``disk_bytes``: its disk tier (0: none)."""
        self.index, self.config, self.policy, self.cost = index, config, policy, cost
        self.launch, self.pcie = launch, (f"pcie{index}",)
        self.links = (f"pcie{index}", f"nic{index}", f"disk{index}")  # those its flows cross
        self.state = S.init(config)
        R = config.scheduler.slots
        self.block_size = config.cache.block_size
        self.block_bytes = config.model.kv_bytes_per_token() * self.block_size  # all layers
        self.slot_request = np.full(R, -1, np.int64)
        self.slot_session = np.full(R, S.NO_SESSION, np.int64)
        self.host = HostTier(config.cache.num_host_blocks, self.block_bytes)
        self.generation = np.zeros(R, np.int64)  # a slot's host entry changes hands: stale copies
        self.stored = np.zeros(R, np.int64)  # tokens the scheduler was told the host holds
        self.writing: set[int] = set()  # slots with a device -> host copy in flight
        self.arriving: set[int] = set()  # migrated in, still on its way to the host tier
        self.to_prefetch: set[int] = set()
        self.prefetching: set[int] = set()
        # The disk tier: session -> tokens of its K,V saved there, least recently saved first.
        self.disk: collections.OrderedDict[int, int] = collections.OrderedDict()
        self.disk_bytes, self.disk_used = disk_bytes, 0
        self.pending: list[SimRequest] = []
        self.requests: dict[int, SimRequest] = {}  # admitted, unfinished
        self.clock = 0.0  # when its next step starts
        # Until when its steps only decode (set by ``run``; any other change of its state
        # voids it): see ``parked_until``.
        self.quiet_until = -math.inf
        self.waiting_on: set[object] = set()  # copies its next step waits for (layer-wise)
        self.idle = True  # nothing to step until an event
        self.free_blocks = config.cache.num_device_blocks - 1
        self.steps = 0  # steps run
        self.rounds = 0  # scheduler calls they took (a steady run is one)
        self.stretch_steps = STRETCH_STEPS  # most steps one ``run`` takes
        self.decode_run = DECODE_RUN  # 1: step one by one

    @property
    def state(self) -> S.SchedulerState:
        return self._state

    @state.setter
    def state(self, state: S.SchedulerState) -> None:
        """A change other than its own steps voids their forecast (``run`` makes a new one)."""
        self._state, self.quiet_until = state, -math.inf

    # ------------------------------------------------------------ requests

    @property
    def busy(self) -> bool:
        return bool(self.requests or self.pending)

    def submit(self, request: SimRequest) -> None:
        self.pending.append(request)
        self.idle = False

    @property
    def parked_until(self) -> float:
        """Until when, left alone, its steps only decode and it reports nothing: ``quiet_until``,
        unless its next step would first admit requests or start a prefetch (-inf)."""
        if self.pending or any(self._blocks_to_prefetch(s) <= self.free_blocks
                               for s in self.to_prefetch):
            return -math.inf
        return self.quiet_until

    def held(self, session_id: int) -> bool:
        """Whether K,V migrated here for ``session_id`` is still on its way in."""
        slots = np.flatnonzero(self.slot_session == session_id)
        return any(int(s) in self.arriving or int(s) in self.prefetching for s in slots)

    def admit(self) -> list[SimRequest]:
        """Admit the pending requests whose session's K,V is not arriving (the engine admits
        what is waiting before each step), each taking ``cost.admission_s`` of the node's
        time; returns the rejected ones."""
        rejected = []
        while ready := [r for r in self.pending if not self.held(r.session_id)][:ADMIT_BATCH]:
            taken = {r.request_id for r in ready}
            self.pending = [r for r in self.pending if r.request_id not in taken]
            self.clock += len(ready) * self.cost.admission_s
            rejected += self._admit(ready)
        return rejected

    def _admit(self, ready: list[SimRequest]) -> list[SimRequest]:
        MB = self.config.max_blocks_per_seq
        new = S.new_requests([r.request_id for r in ready], [r.prompt_len for r in ready],
                             [r.max_new_tokens for r in ready],
                             session_id=[r.session_id for r in ready],
                             history_len=[max(r.history_len - 1, 0) for r in ready],
                             arrival=[r.arrival_s for r in ready], size=ADMIT_BATCH)
        prompts = None
        if self.policy.prefix_caching:  # the prompts' full blocks
            full = jnp.arange(MB) < (new.prompt_len // self.block_size)[:, None]
            prompts = prefixes(new.session_id, new.request_id, MB)
            prompts = dataclasses.replace(prompts, keys=jnp.where(full[..., None], prompts.keys, 0))
        self.state, slots, reasons = admission.admit(
            self.state, new, limits=self.config.scheduler, policy=self.policy, prompts=prompts)
        slots, reasons = jax.device_get((slots, reasons))
        rejected = []
        for r, slot, reason in zip(ready, slots.tolist(), reasons.tolist()):
            if reason != S.ADMITTED:
                r.finish_reason = f"rejected: {S.REASONS[reason]}"
                rejected.append(r)
                continue
            if self.slot_session[slot] != r.session_id:
                self._forget(slot)
            r.slot, self.slot_request[slot], self.slot_session[slot] = slot, r.request_id, \
                r.session_id
            self.requests[r.request_id] = r
            self.to_prefetch.discard(slot)
        return rejected

    # ------------------------------------------------------------ stepping

    def run(self, horizon: float, max_steps: int | None = None) -> Stretch:
        """Steps from ``self.clock`` while before ``horizon`` (see ``advance``); moves the
        clock and starts the copies of its last step."""
        start = self.clock
        limit = np.float32(min(horizon - start, 3.0e38))
        wake = min(map(self._blocks_to_prefetch, self.to_prefetch),
                   default=np.iinfo(np.int32).max)
        self.state, out = advance(self.state, np.float32(start), limit, np.int32(wake),
                                  limits=self.config.scheduler, policy=self.policy,
                                  cost=self.cost, max_steps=max_steps or self.stretch_steps,
                                  decode_run=self.decode_run)
        out = Stretch.unpack(self.config.scheduler.slots, *jax.device_get(out))
        self.steps += int(out.steps)
        self.rounds += int(out.rounds)
        self.free_blocks = int(out.free_blocks)
        self.clock, self.quiet_until = start + float(out.elapsed), start + float(out.quiet)
        if out.copies:
            self._copies(out, start + float(out.last_start))
        self.idle = bool(out.idle) and not out.copies
        return out

    def _copies(self, out: Stretch, start: float) -> None:
        """Start the copies of a step that started at ``start``."""
        for slot in np.flatnonzero(out.offloads):
            self.write(int(slot), int(out.cached_before[slot]), start)
        restoring = np.flatnonzero(out.restore_groups)
        if not len(restoring):
            return
        # Only the groups missing on the device move: the upper ones (a purge took them).
        G = self.config.cache.num_layer_groups
        nbytes = sum(self._bytes_of(int(out.host_tokens[s]),
                                    np.arange(G) >= G - out.restore_groups[s])
                     for s in restoring)
        for slot in restoring:
            self.host.touch(int(slot))
        slots, copy = [int(s) for s in restoring], object()
        if self.policy.layerwise_loading:  # the step computed while its K,V came in: it
            self.waiting_on.add(copy)  # ends once both are done
        self.launch(start, self.pcie, nbytes, lambda t: self._restored(slots, copy, t))

    def _restored(self, slots: list[int], copy: object, t: float) -> None:
        if copy in self.waiting_on:
            self.waiting_on.discard(copy)
            self.clock = max(self.clock, t)
        else:
            self.state = tiers.loaded(self.state, self._slots(slots))
        self.idle = False

    def reported(self, t: float) -> float:
        """When the host reads the tokens of a step that ended at ``t``."""
        return t + self.cost.report_s

    def finished(self, out: Stretch) -> list[SimRequest]:
        """The requests ``out`` finished (reported ``cost.report_s`` after the step), with their
        counts; their slots are released, and a session under retention ``host`` has its K,V
        written back."""
        done, filled = [], []
        for slot in np.flatnonzero(out.finished).tolist():
            request = self.requests.pop(int(self.slot_request[slot]))
            request.prefill_tokens += int(out.computed[slot])
            request.recomputed_tokens += int(out.recomputed[slot])
            request.finish_reason, request.finish_s = "length", self.reported(self.clock)
            self.slot_request[slot] = -1
            if self.policy.retention == "host" and out.cached[slot] > 0:
                filled += self.write_back(slot, int(out.cached[slot]))
            done.append(request)
        if filled:
            slots, tokens = zip(*filled)
            self.state = tiers.stored(self.state, self._slots(slots), self._values(tokens))
        return done

    def write_back(self, slot: int, tokens: int) -> list[tuple[int, int]]:
        """Write a finished turn's K,V back. The engine copies each block as it fills and the
        last partial one when the turn ends; here the bytes of the whole turn cross the link
        now, and the host holds its full blocks from now on (returns ``[(slot, their
        tokens)]`` for ``tiers.stored``, or ``[]``), the partial one once the copy is done."""
        full = tokens - tokens % self.block_size
        if not self.write(slot, tokens, self.clock) or full <= self.stored[slot]:
            return []
        self.stored[slot] = full
        return [(slot, full)]

    # ------------------------------------------------------------ host tier

    def write(self, slot: int, tokens: int, now: float) -> bool:
        """Copy ``slot``'s first ``tokens`` tokens' blocks not yet on the host to it; returns
        whether a copy started (none: nothing new, one already running, or no room)."""
        if tokens <= self.host.tokens(slot) or slot in self.writing:
            return False
        chunks = self._chunks(self.host.written_blocks(slot, self.block_size), tokens)
        if not self._store(slot, chunks, tokens):
            return False
        self.writing.add(slot)
        generation = self.generation[slot]
        self.launch(now, self.pcie, sum(c.nbytes for c in chunks),
                    lambda t: self._written(slot, tokens, generation))
        return True

    def _chunks(self, first: int, tokens: int) -> list[_Blocks]:
        """Blocks ``first`` on of a sequence's first ``tokens`` tokens: the full ones, then the
        partial one apart (a later write replaces it)."""
        full = tokens // self.block_size
        runs = [(first, full - first), (full, int(tokens % self.block_size > 0))]
        return [_Blocks(b, n, n * self.block_bytes) for b, n in runs if n > 0]

    def _written(self, slot: int, tokens: int, generation: int) -> None:
        self.writing.discard(slot)
        if generation == self.generation[slot]:
            self.stored[slot] = tokens
            self.state = tiers.stored(self.state, self._slots([slot]), self._values([tokens]))
        self.idle = False

    def _store(self, slot: int, chunks: list[_Blocks], tokens: int) -> bool:
        try:
            evicted = self.host.extend(slot, chunks, tokens, protect=self.prefetching)
        except HostTierFull:
            self._lose([slot])
            return False
        self._spill(evicted)
        self._lose([key for key, _ in evicted])
        return True

    def _spill(self, evicted: list) -> None:
        """Save the sessions' entries the host tier evicted to the disk tier (the least recently
        saved give way), their bytes crossing the disk link (as ``engine.host_kv``)."""
        nbytes = 0
        for slot, entry in evicted:
            session, size = int(self.slot_session[slot]), self.kv_bytes(entry.tokens)
            if session == S.NO_SESSION or size > self.disk_bytes:
                continue
            self.unsave(session)
            while self.disk_used + size > self.disk_bytes:
                self.unsave(next(iter(self.disk)))
            self.disk[session], self.disk_used = entry.tokens, self.disk_used + size
            nbytes += size
        if nbytes:
            self.launch(self.clock, (f"disk{self.index}",), nbytes, lambda t: None)

    def unsave(self, session_id: int) -> int:
        """Drop ``session_id``'s entry from the disk tier; returns its tokens (0: none)."""
        tokens = self.disk.pop(session_id, 0)
        self.disk_used -= self.kv_bytes(tokens)
        return tokens

    def kv_bytes(self, tokens: int) -> int:
        """Bytes of a sequence's K,V of ``tokens`` tokens, all layers, whole blocks."""
        return -(-tokens // self.block_size) * self.block_bytes

    def _lose(self, slots: list[int]) -> None:
        if not slots:
            return
        for slot in slots:
            self._forget(slot)
        self.state = tiers.lost(self.state, self._slots(slots))

    def _forget(self, slot: int) -> None:
        self.host.drop(slot)
        self.generation[slot] += 1
        self.stored[slot] = 0
        for pending in (self.writing, self.arriving, self.to_prefetch, self.prefetching):
            pending.discard(slot)

    def _slots(self, slots: list[int]) -> np.ndarray:
        R = self.config.scheduler.slots
        return padded(slots, R, R)

    def _values(self, values: list[int]) -> np.ndarray:
        return padded(values, self.config.scheduler.slots, 0)

    # ------------------------------------------------------------ migration

    def idle_slot(self, session_id: int) -> int | None:
        """The slot holding idle ``session_id``'s K,V here (None: none, or not idle)."""
        held = np.flatnonzero(self.slot_session == session_id)
        if not len(held):
            return None
        slot = int(held[0])
        status = int(np.asarray(self.state.requests.status)[slot])
        if status != S.FINISHED or self.slot_request[slot] >= 0 or slot in self.prefetching:
            return None
        return slot

    def missing_slot(self, session_id: int) -> int | None:
        """The slot of idle ``session_id`` whose device misses layer groups of its K,V that
        the host tier holds (None: no such slot)."""
        slot = self.idle_slot(session_id)
        if slot is None or self.stored[slot] == 0 or (
                np.asarray(self.state.blocks.num_tokens)[:, slot] > 0).all():
            return None
        return slot

    def prefetch_slot(self, slot: int, now: float) -> None:
        """Before an idle session's next request, copy into free blocks the layer groups of
        its K,V that only the host tier holds (``missing_slot``), lower layers first (as
        ``Engine.prefetch_session``)."""
        self.to_prefetch.add(slot)
        self.idle = False
        self.prefetch(now)

    def session_tokens(self, slot: int) -> int:
        cached = int(np.asarray(self.state.cached_tokens)[slot])
        return max(cached, self.host.tokens(slot))

    def import_session(self, session_id: int, tokens: int) -> int | None:
        """Adopt a slot for ``session_id`` whose K,V (``tokens``) is on its way to this host
        tier (an empty one, else the least recently used idle session's, evicted); returns the
        slot, or None (no such slot, no room)."""
        self.drop_session(session_id)
        free = self.slot_request < 0
        free[list(self.arriving | self.prefetching)] = False
        chosen = admission.slot_to_adopt(self.state.requests, free)
        if chosen is None:
            return None
        slot, held = chosen
        if held:
            self.drop_session(int(self.slot_session[slot]))  # the least recently used
        self.state = tiers.adopt(self.state, self._slots([slot]), self._values([session_id]),
                                 self.clock)
        self._forget(slot)
        self.slot_session[slot] = session_id
        if not self._store(slot, self._chunks(0, tokens), tokens):
            return None
        self.arriving.add(slot)
        return slot

    def imported(self, slot: int, tokens: int, generation: int) -> None:
        """A migration into ``slot`` reached the host tier: stored, then prefetched."""
        self.arriving.discard(slot)
        if generation != self.generation[slot]:
            return
        self.stored[slot] = tokens
        self.state = tiers.stored(self.state, self._slots([slot]), self._values([tokens]))
        self.to_prefetch.add(slot)
        self.idle = False

    def prefetch(self, now: float, instant: bool = False) -> None:
        """Copy the sessions to prefetch into free blocks (``tiers.prefetch``: lower layer
        groups first, in slot order while they fit); only the groups given blocks move."""
        need = self._blocks_to_prefetch
        slots = [s for s in sorted(self.to_prefetch) if need(s) <= self.free_blocks]
        if not slots:
            return
        self.state, given = tiers.prefetch(self.state, self._slots(slots))
        for slot, got in zip(slots, np.asarray(given)[:, :len(slots)].T):
            if not got.any():
                continue
            self.to_prefetch.discard(slot)
            self.prefetching.add(slot)
            self.free_blocks -= need(slot) * int(got.sum())
            nbytes = 0 if instant else self._bytes_of(int(self.stored[slot]), got)
            generation = self.generation[slot]
            self.launch(now, self.pcie, nbytes,
                        functools.partial(self._prefetched, slot, generation))

    def _bytes_of(self, tokens: int, groups: np.ndarray) -> int:
        """Bytes of the K,V of a sequence's first ``tokens`` tokens in the layers of ``groups``
        (bool[G]), whole blocks."""
        layers = sum(size for g, _, size in kv_cache.group_spans(self.config.layer_groups)
                     if groups[g])
        return self.kv_bytes(tokens) * layers // self.config.model.num_layers

    def _blocks_to_prefetch(self, slot: int) -> int:
        """Blocks of the pool a slot's stored K,V takes in one layer group."""
        return -(-int(self.stored[slot]) // self.block_size)

    def _prefetched(self, slot: int, generation: int, t: float) -> None:
        if generation == self.generation[slot] and slot in self.prefetching:
            self.prefetching.discard(slot)
            self.state = tiers.loaded(self.state, self._slots([slot]))
        self.idle = False

    def drop_session(self, session_id: int) -> None:
        """Free idle ``session_id``'s K,V here (device and host tier)."""
        slot = self.idle_slot(session_id)
        if slot is None:
            return
        self.state = admission.abort(self.state, self._slots([slot]))
        self.slot_session[slot] = S.NO_SESSION
        self._forget(slot)

    # ------------------------------------------------------------ records

    def progress(self) -> dict[int, tuple[int, int, int]]:
        """Each admitted unfinished request's (tokens generated, prompt tokens computed,
        history tokens recomputed) so far."""
        r = self.state.requests
        generated, computed, recomputed = (np.asarray(a) for a in jax.device_get(
            (r.num_generated, r.computed, r.recomputed_history)))
        return {request.request_id: (int(generated[request.slot]), int(computed[request.slot]),
                                     int(recomputed[request.slot]))
                for request in self.requests.values()}

    @property
    def device_bytes(self) -> int:
        return (self.config.cache.num_device_blocks - 1 - self.free_blocks) * (
            self.config.block_bytes)

    @property
    def host_bytes(self) -> int:
        return self.host.used_bytes
