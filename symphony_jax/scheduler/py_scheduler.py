"""The scheduler in plain Python, of the usual engine design, making the jitted one's decisions.

Per-slot records, a running list and a waiting queue kept in policy order, an idle set, a
``PyBlockAllocator`` with a row per slot in each layer group, and a numpy copy of those rows
from which a step's ``BatchLayout`` is built and moved to the device. Its transitions are those
of ``admission`` and ``step`` (read their docs for the rules), decision for decision: it is the
oracle of the scheduler's equivalence tests and the baseline of
``experiments/bench/scheduler.py``. Block ids are its allocator's own; the jitted table may
number them otherwise.

Prefix caching is not mirrored.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from symphony_jax.config import EngineConfig
from symphony_jax.memory.layout import BatchLayout
from symphony_jax.memory.py_allocator import PyBlockAllocator
from symphony_jax.scheduler import state as S
from symphony_jax.scheduler.admission import ACTIVE, IDLE
from symphony_jax.scheduler.policy import Policy

WAITS = (S.WAITING, S.PREEMPTED)  # statuses of the waiting queue


def _f32(x) -> float:
    """``x`` rounded to float32: times are float32 in the jitted state."""
    return float(np.float32(x))


def _blocks_needed(cached: int, tokens: int, block_size: int) -> int:
    """Blocks that ``tokens`` more tokens add to a sequence of ``cached`` tokens."""
    return -(-(cached + tokens) // block_size) + (-cached // block_size)


def _overlap(start: int, length: int, end: int) -> int:
    """Length of [start, start + length) within [0, end)."""
    return max(min(start + length, end) - start, 0)


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    """An arriving request (the fields of ``state.NewRequests``)."""

    request_id: int
    prompt_len: int  # history + new input
    max_new_tokens: int
    session_id: int = S.NO_SESSION
    history_len: int = 0
    priority: int = 0
    arrival: float = 0.0


def as_new_requests(requests: Sequence[Request], size: int | None = None) -> S.NewRequests:
    """The same requests as a padded batch for ``admission.admit``."""
    column = lambda name: [getattr(r, name) for r in requests]
    return S.new_requests(column("request_id"), column("prompt_len"), column("max_new_tokens"),
                          session_id=column("session_id"), history_len=column("history_len"),
                          priority=column("priority"), arrival=column("arrival"), size=size)


@dataclasses.dataclass(slots=True)
class Slot:
    """One slot's request (the fields of ``state.Requests``; times are float32 values)."""

    status: int = S.EMPTY
    session_id: int = S.NO_SESSION
    request_id: int = -1
    prompt_len: int = 0
    history_len: int = 0
    max_new_tokens: int = 0
    num_generated: int = 0
    priority: int = 0
    arrival: float = 0.0
    last_used: float = 0.0
    expiry: float = 0.0
    cached_at_admission: int = 0
    computed: int = 0
    recomputed_history: int = 0
    preemptions: int = 0
    host_tokens: int = 0  # always 0: this scheduler has no host tier


@dataclasses.dataclass(frozen=True, slots=True)
class PyPlan:
    """What one step runs: the fields of ``step.StepPlan``, per slot where it has one."""

    query_lens: list[int]
    order: list[int]  # scheduled slots in batch order, then num_slots (padding)
    num_seqs: int
    num_tokens: int
    samples: list[bool]
    preempted: list[bool]
    offloads: list[bool]  # always False: no host tier
    restores: list[bool]  # always False
    restore_groups: list[int]  # always 0
    evicted: list[bool]
    decode_only: bool


class PyScheduler:
    """One node's scheduler: ``admit``, ``schedule``, ``layout``, ``commit``, ``abort``."""

    def __init__(self, config: EngineConfig, policy: Policy):
        if policy.uses_host:
            raise ValueError(f"PyScheduler: policy preemption={policy.preemption!r}, retention="
                             f"{policy.retention!r} needs a host tier, which this scheduler "
                             "does not model")
        limits = config.scheduler
        if not policy.chunked_prefill and limits.max_num_batched_tokens < limits.max_model_len:
            raise ValueError(
                f"PyScheduler: without chunked prefill max_num_batched_tokens="
                f"{limits.max_num_batched_tokens} must be >= max_model_len={limits.max_model_len}")
        self.limits, self.policy = limits, policy
        self.num_slots = R = limits.slots
        self.block_size, self.num_blocks = config.cache.block_size, config.cache.num_device_blocks
        self.groups, width = config.cache.num_layer_groups, config.max_blocks_per_seq
        self.allocator = PyBlockAllocator(R, self.num_blocks, width, self.block_size, self.groups)
        self.rows = np.zeros((self.groups, R + 1, width), np.int32)  # row R: padding (null block)
        self.slots = [Slot() for _ in range(R)]
        self.running: list[int] = []  # RUNNING slots in policy order
        self.waiting: list[int] = []  # WAITING and PREEMPTED slots in policy order
        self.idle: set[int] = set()  # FINISHED slots: idle sessions
        self.holder: dict[int, int] = {}  # session -> its non-empty slot

    def _key(self, s: int) -> tuple:
        """A slot's place within its group of the scheduling order."""
        rec = self.slots[s]
        priority = rec.priority if self.policy.order == "priority" else 0
        return priority, rec.arrival, rec.request_id, s

    @property
    def cached_tokens(self) -> list[int]:
        """Tokens of each slot with cached K,V (group 0, like ``SchedulerState``)."""
        return self.allocator.tokens[0]

    # -- bookkeeping -------------------------------------------------------------------------

    def _set_status(self, s: int, status: int) -> None:
        """Move slot ``s`` to ``status`` and to the list or set that holds that status."""
        rec = self.slots[s]
        if rec.status == S.RUNNING:
            self.running.remove(s)
        elif rec.status in WAITS:
            self.waiting.remove(s)
        elif rec.status == S.FINISHED:
            self.idle.discard(s)
        rec.status = status
        if status == S.RUNNING:
            bisect.insort(self.running, s, key=self._key)
        elif status in WAITS:
            bisect.insort(self.waiting, s, key=self._key)
        elif status == S.FINISHED:
            self.idle.add(s)
        elif status == S.EMPTY and self.holder.get(rec.session_id) == s:
            del self.holder[rec.session_id]

    def _free(self, slots: Sequence[int]) -> None:
        self.allocator.free(slots)
        self.rows[:, [s for s in slots if 0 <= s < self.num_slots]] = 0

    def _reserve(self, slots: list[int], counts: list[int]) -> None:
        bs, tokens = self.block_size, self.cached_tokens
        spans = [(s, -(-tokens[s] // bs), -(-(tokens[s] + n) // bs)) for s, n in zip(slots, counts)]
        self.allocator.reserve(slots, counts)
        for g, rows in enumerate(self.allocator.blocks):
            for s, first, end in spans:
                if end > first:
                    self.rows[g, s, first:end] = rows[s][first:end]

    # -- admission ---------------------------------------------------------------------------

    def _check(self, r: Request) -> int:
        """``state.ADMITTED`` or why ``r`` can never be admitted, whatever the table holds."""
        if (r.request_id < 0 or r.prompt_len < 1 or r.max_new_tokens < 1 or r.history_len < 0
                or r.history_len >= r.prompt_len):
            return S.INVALID
        if r.prompt_len + r.max_new_tokens > self.limits.max_model_len:
            return S.TOO_LONG
        if (-(-(r.prompt_len + r.max_new_tokens) // self.block_size) * self.groups
                > self.num_blocks - 1):
            return S.NO_MEMORY
        return S.ADMITTED

    def _spare_slots(self, reused: set[int]) -> list[int]:
        """Slots for requests without one: empty ones by index, then idle sessions (not reused
        by this batch) least recently used first."""
        slots = self.slots
        empty = [s for s in range(self.num_slots) if slots[s].status == S.EMPTY]
        idle = sorted((s for s in range(self.num_slots)
                       if slots[s].status in IDLE and s not in reused),
                      key=lambda s: (slots[s].last_used, s))
        return empty + idle

    def admit(self, requests: Sequence[Request]) -> tuple[list[int], list[int]]:
        """Admit ``requests`` in order. Returns each one's slot (``num_slots`` where none) and
        its reason (``state.ADMITTED`` or why not)."""
        R, slots = self.num_slots, self.slots
        reasons, chosen, reused, seen = [], [], set(), set()
        for r in requests:  # judged on the table before the batch
            reason, own = self._check(r), None
            if reason == S.ADMITTED and r.session_id != S.NO_SESSION:
                own = self.holder.get(r.session_id)
                if (own is not None and slots[own].status in ACTIVE) or r.session_id in seen:
                    reason, own = S.SESSION_BUSY, None
                seen.add(r.session_id)
            if own is not None:
                reused.add(own)
            reasons.append(reason)
            chosen.append(own)
        fresh = [i for i, (reason, s) in enumerate(zip(reasons, chosen))
                 if reason == S.ADMITTED and s is None]
        spare = self._spare_slots(reused) if fresh else []
        for i, s in zip(fresh, spare):
            chosen[i] = s
        for i in fresh[len(spare):]:
            reasons[i] = S.NO_SLOT
        # Fresh slots start from nothing; so does a retained K,V whose retention expired before
        # the request arrived, or that covers the whole new prompt.
        tokens = self.cached_tokens
        stale = sorted(s for r, s in zip(requests, chosen) if s is not None and (
            s not in reused or tokens[s] >= r.prompt_len
            or slots[s].expiry <= _f32(r.arrival)))
        self._free(stale)
        for r, s in zip(requests, chosen):
            if s is not None:
                self._start(s, r)
        return [R if s is None else s for s in chosen], reasons

    def _start(self, s: int, r: Request) -> None:
        """Write request ``r`` into slot ``s``, waiting (the slot keeps its ``last_used``)."""
        self._set_status(s, S.EMPTY)  # the slot's idle session, if any, gives it away
        self.slots[s] = Slot(
            session_id=r.session_id, request_id=r.request_id, prompt_len=r.prompt_len,
            history_len=r.history_len, max_new_tokens=r.max_new_tokens, priority=r.priority,
            arrival=_f32(r.arrival), last_used=self.slots[s].last_used, expiry=float(S.NEVER),
            cached_at_admission=self.cached_tokens[s])
        if r.session_id != S.NO_SESSION:
            self.holder[r.session_id] = s
        self._set_status(s, S.WAITING)

    def abort(self, slots: Sequence[int]) -> None:
        """End the requests in ``slots`` now (out of range: ignored): their K,V is freed and
        the slots become empty."""
        for s in slots:
            if 0 <= s < self.num_slots:
                self._set_status(s, S.EMPTY)
        self._free(slots)

    # -- one step ----------------------------------------------------------------------------

    def _order(self, wants: list[int]) -> list[int]:
        """Active slots in scheduling order; fills ``wants`` with the tokens each asks for."""
        slots, tokens = self.slots, self.cached_tokens
        decoding, prompting = [], []
        for s in self.running:
            rec = slots[s]
            wants[s] = want = rec.prompt_len + rec.num_generated - tokens[s]
            (decoding if want == 1 else prompting).append(s)
        for s in self.waiting:
            rec = slots[s]
            wants[s] = rec.prompt_len + rec.num_generated - tokens[s]
        if self.policy.prefill == "decode_first":
            return decoding + prompting + self.waiting
        return self.waiting + prompting + decoding

    def _budget(self, order: list[int], wants: list[int], excluded: set[int]) -> list[int]:
        """Tokens granted to each slot (``step._budget``): in order, within the token budget,
        whole prompts only without chunked prefill, at most ``max_num_seqs`` slots."""
        grant, before, count = [0] * self.num_slots, 0, 0
        budget, chunked = self.limits.max_num_batched_tokens, self.policy.chunked_prefill
        for s in order:
            want = 0 if s in excluded else wants[s]
            if not want:
                continue
            got = min(budget - before, want) if chunked else (
                want if before + want <= budget else 0)
            before += want
            if got <= 0 or count == self.limits.max_num_seqs:
                break  # every later slot gets nothing either
            grant[s], count = got, count + 1
        return grant

    def _running_need(self, order: list[int], grant: list[int]) -> int:
        """Blocks the running slots' grants take, in every layer group."""
        slots, tokens, bs = self.slots, self.cached_tokens, self.block_size
        return self.groups * sum(_blocks_needed(tokens[s], grant[s], bs) for s in order
                                 if grant[s] and slots[s].status == S.RUNNING)

    def _first_misfit(self, order: list[int], grant: list[int], running_need: int) -> int | None:
        """Position of the first waiting slot whose blocks do not fit after the running slots'
        (``running_need``) and the earlier waiting slots'."""
        slots, tokens, bs = self.slots, self.cached_tokens, self.block_size
        spare, total = self.allocator.num_free_blocks - running_need, 0
        for i, s in enumerate(order):
            if grant[s] and slots[s].status in WAITS:
                need = self.groups * _blocks_needed(tokens[s], grant[s], bs)
                total += need
                if need and total > spare:
                    return i
        return None

    def _victims(self, order: list[int], after: int, for_running: bool) -> list[int]:
        """Who may give way, in the order they do: idle sessions least recently used first,
        then waiting slots after rank ``after`` holding a retained K,V (last first), then, for
        running slots only, the running slots (last first)."""
        slots, tokens = self.slots, self.cached_tokens
        idle = sorted((s for s in self.idle if tokens[s] > 0),
                      key=lambda s: (slots[s].last_used, s))
        waiting = [s for s in reversed(order[after + 1:])
                   if slots[s].status in WAITS and tokens[s] > 0]
        running = ([s for s in reversed(order) if slots[s].status == S.RUNNING]
                   if for_running else [])
        return idle + waiting + running

    def _make_room(self, victim: int, grant: list[int], evicted: list[bool],
                   preempted: list[bool]) -> None:
        """``victim`` gives its K,V way: an idle session empties, a waiting or running slot is
        preempted."""
        if self.slots[victim].status == S.FINISHED:
            evicted[victim], status = True, S.EMPTY
        else:
            grant[victim], preempted[victim], status = 0, True, S.PREEMPTED
        self._free([victim])
        self._set_status(victim, status)

    def _settle(self, order: list[int], wants: list[int], evicted: list[bool],
                preempted: list[bool]) -> list[int]:
        """The tokens each slot runs once budget and memory agree (``step.schedule``'s fixed
        point): budget for every slot not denied; room for the running ones (idle sessions,
        then the last running slots, give way); waiting ones that fit, in order, after idle
        sessions gave way; from the first that does not fit, every waiting slot is denied and
        the budget is handed out again, until nothing new is denied."""
        denied: set[int] = set()
        while True:
            preempted_before = sum(preempted)
            excluded = denied | {s for s in order if preempted[s]}
            grant = self._budget(order, wants, excluded)
            need = self._running_need(order, grant)
            while need > self.allocator.num_free_blocks:
                victims = self._victims(order, -1, for_running=True)
                if not victims:
                    break
                self._make_room(victims[0], grant, evicted, preempted)
                need = self._running_need(order, grant)
            misfit = self._first_misfit(order, grant, need)
            while misfit is not None:
                victims = self._victims(order, misfit, for_running=False)
                if not victims:
                    break
                self._make_room(victims[0], grant, evicted, preempted)
                misfit = self._first_misfit(order, grant, need)
            changed = sum(preempted) > preempted_before
            for s in order[misfit:] if misfit is not None else []:
                if self.slots[s].status in WAITS:
                    grant[s] = 0
                    changed |= s not in denied
                    denied.add(s)
            if not changed:
                return grant

    def schedule(self, now: float) -> PyPlan:
        """Decide this step (``step.schedule``): reserves blocks for the scheduled tokens."""
        R, slots, tokens = self.num_slots, self.slots, self.cached_tokens
        now = _f32(now)
        evicted, preempted, wants = [False] * R, [False] * R, [0] * R
        expired = sorted(s for s in self.idle if slots[s].expiry <= now)
        for s in expired:
            evicted[s] = tokens[s] > 0
        self._free([s for s in expired if evicted[s]])
        for s in expired:
            self._set_status(s, S.EMPTY)

        order = self._order(wants)
        grant = self._settle(order, wants, evicted, preempted)
        batch = [s for s in order if grant[s]]
        samples = [False] * R
        for s in batch:
            rec, cached, n = slots[s], tokens[s], grant[s]
            samples[s] = cached + n == rec.prompt_len + rec.num_generated
            rec.computed += _overlap(cached, n, rec.prompt_len)
            rec.recomputed_history += _overlap(cached, n, rec.history_len)
            rec.last_used = now
        for s in order:
            slots[s].preemptions += preempted[s]
        self._reserve(batch, [grant[s] for s in batch])
        for s in batch:
            if slots[s].status != S.RUNNING:
                self._set_status(s, S.RUNNING)
        return PyPlan(query_lens=grant, order=batch + [R] * (R - len(batch)),
                      num_seqs=len(batch), num_tokens=sum(grant[s] for s in batch),
                      samples=samples, preempted=preempted, offloads=[False] * R,
                      restores=[False] * R, restore_groups=[0] * R, evicted=evicted,
                      decode_only=bool(batch) and all(grant[s] == 1 for s in batch))

    def layout(self, plan: PyPlan, num_seqs: int, num_tokens: int) -> BatchLayout:
        """The batch of ``plan`` in ``num_seqs`` sequences and ``num_tokens`` tokens (at least
        the plan's counts), built with numpy and put on the device: ``memory.layout.build``'s
        arrays for the same step."""
        if num_seqs < plan.num_seqs or num_tokens < plan.num_tokens:
            raise ValueError(f"PyScheduler.layout: a bucket of ({num_seqs}, {num_tokens}) cannot "
                             f"hold {plan.num_seqs} sequences of {plan.num_tokens} tokens")
        R, bs, n, total = self.num_slots, self.block_size, plan.num_seqs, plan.num_tokens
        i32 = np.int32
        seq_slots = np.full(num_seqs, R, i32)
        seq_slots[:n] = plan.order[:n]
        query_lens, context_lens = np.zeros(num_seqs, i32), np.zeros(num_seqs, i32)
        tokens = self.cached_tokens
        query_lens[:n] = [plan.query_lens[s] for s in plan.order[:n]]
        context_lens[:n] = [tokens[s] for s in plan.order[:n]]
        ends = np.cumsum(query_lens, dtype=i32)
        seq = np.repeat(np.arange(n, dtype=i32), query_lens[:n])  # each token's sequence
        first = context_lens - ends  # a sequence's position at flat index 0
        token_slots, positions = np.full(num_tokens, R, i32), np.zeros(num_tokens, i32)
        token_slots[:total] = seq_slots[seq]
        positions[:total] = first[seq] + np.arange(total, dtype=i32)
        block_tables = self.rows[:, seq_slots]
        slot_mapping = np.full((self.groups, num_tokens), self.num_blocks * bs, i32)
        slot_mapping[:, :total] = (block_tables[:, seq, positions[:total] // bs] * bs
                                   + positions[:total] % bs)
        return jax.device_put(BatchLayout(
            seq_slots=seq_slots, query_start_loc=np.concatenate([np.zeros(1, i32), ends]),
            context_lens=context_lens, token_slots=token_slots, positions=positions,
            slot_mapping=slot_mapping, block_tables=block_tables,
            logits_indices=np.maximum(ends - 1, 0)))

    def commit(self, plan: PyPlan, stop: Sequence[bool], now: float) -> list[bool]:
        """Count the sampled tokens; finish requests on a stop flag (per slot) or at
        ``max_new_tokens``; keep or drop their K,V as the retention policy says. Returns the
        slots that finished (per slot)."""
        now, finished, dropped = _f32(now), [False] * self.num_slots, []
        retain = self.policy.retention != "drop"
        expiry = _f32(np.float32(now) + np.float32(self.policy.retention_s))
        for s in plan.order[:plan.num_seqs]:
            if not plan.samples[s]:
                continue
            rec = self.slots[s]
            rec.num_generated += 1
            if not (stop[s] or rec.num_generated >= rec.max_new_tokens):
                continue
            finished[s], rec.last_used = True, now
            if retain and rec.session_id != S.NO_SESSION:
                rec.expiry = expiry
                self._set_status(s, S.FINISHED)
            else:
                dropped.append(s)
                self._set_status(s, S.EMPTY)
        self._free(sorted(dropped))
        return finished
