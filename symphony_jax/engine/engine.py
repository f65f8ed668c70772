"""One node's engine: the scheduler and the model on one JAX device.

Online: ``add_request`` (token ids or text), ``step`` (returns the tokens produced), ``abort``.
Offline: ``generate``. Each ``step`` admits waiting requests, schedules on the device, reads
back the plan's size to pick a shape bucket, dispatches the fused step (model, sampling, commit)
and, while the device runs it, turns the previous step's sampled tokens into outputs — so the
tokens of a step are returned by the next call. A request of a session continues the session:
its prompt is the session's tokens so far followed by the new ones.

Sessions' K,V can move between engines (nodes of a cluster): ``export_session`` copies an idle
session's K,V to another device's host memory, ``import_session`` takes it in (host tier, then
free blocks), ``drop_session`` lets an idle session go.

A step compiles once per ``device_step.StepShape`` and device. ``step_shapes`` are those an
engine ran; ``compile_steps`` compiles such shapes ahead of time (another engine's, on this
one's device), so that meeting them later compiles nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from symphony_jax import metrics
from symphony_jax.config import EngineConfig
from symphony_jax.engine import device_step, hashing, validation
from symphony_jax.engine.device_step import (CACHED, COMPUTED, FINISHED, NUM_COUNTS, RECOMPUTED,
                                              REQUEST, SAMPLED, SLOT, TOKEN)
from symphony_jax.engine.host_kv import HostKV
from symphony_jax.engine.sampling import SamplingParams, SamplingTable
from symphony_jax.memory import kv_cache, transfer
from symphony_jax.memory.disk_tier import DiskTier
from symphony_jax.model.params import LlamaParams
from symphony_jax.scheduler import admission, batch, prefix_cache, tiers
from symphony_jax.scheduler import state as S
from symphony_jax.scheduler.policy import Policy


@dataclasses.dataclass
class RequestOutput:
    """Tokens a request produced since the last output, and whether it is over."""

    request_id: int
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length", "abort" or "rejected: <why>"


@dataclasses.dataclass
class Generation:
    request_id: int
    token_ids: list[int]
    text: str | None
    finish_reason: str


@dataclasses.dataclass(frozen=True)
class Residency:
    """Where a session's K,V is on one node."""

    device_tokens: tuple[int, ...]  # tokens on the device, per layer group (lowest first)
    host_tokens: int  # tokens the host tier holds, every layer (copies complete)


@dataclasses.dataclass
class StepRecord:
    """A step as ``Engine(record_steps=True)`` keeps it in ``step_log`` (R slots)."""

    time_s: float  # when it was scheduled, after the admissions just before it
    query_lens: np.ndarray  # i32[R]  tokens each slot computes
    context_lens: np.ndarray  # i32[R]  tokens each slot had cached before it
    admitted: int  # requests taken in (admitted or rejected) just before it
    reported_s: float = float("nan")  # when the host read its outputs (nan: not run, or not yet)


@dataclasses.dataclass
class _Request:
    request_id: int
    prompt: list[int]  # history (its session's tokens so far) and the new tokens
    history_len: int  # of which K,V computed before: the history less its last, sampled token
    sampling: SamplingParams
    session_id: int
    turn_index: int  # requests of its session before it
    arrival_s: float
    cache_salt: str | None
    output: list[int] = dataclasses.field(default_factory=list)
    token_times: list[float] = dataclasses.field(default_factory=list)
    finish_s: float = float("nan")
    finish_reason: str | None = None
    slot: int | None = None
    cached_tokens: int = 0  # prompt tokens cached on admission
    computed_tokens: int = 0  # prompt tokens computed (recomputation included)
    recomputed_tokens: int = 0  # of which history


class Engine:
    """A paged-KV serving engine for one model on one device."""

    def __init__(self, config: EngineConfig, params: LlamaParams, *, policy: Policy = Policy(),
                 tokenizer=None, eos_token_ids: Sequence[int] = (), impl: str = "auto",
                 device=None, admit_batch: int = 8, max_stop_ids: int = 8,
                 clock: Callable[[], float] = time.monotonic, start: float | None = None,
                 disk_dir: str | None = None, record_steps: bool = False,
                 copy_completion: str = "polled"):
        """``clock`` (seconds) times requests from ``start`` (default: now); engines of a
        cluster share both. ``record_steps``: keep each step's ``StepRecord`` in ``step_log``
        (for calibrating a cost model; no extra host reads while running).
        ``copy_completion``: when the host tier's copies count as complete, ``"polled"`` (as
        soon as a step finds them ready: fastest, but decisions then depend on timing) or
        ``"next_step"`` (at the step after the one that issued them, waiting if need be: with a
        deterministic ``clock``, a seeded run is reproducible step for step)."""
        self.config, self.policy, self.tokenizer, self.impl = config, policy, tokenizer, impl
        self.eos_token_ids = tuple(eos_token_ids or getattr(tokenizer, "eos_token_ids", ()))
        self.admit_batch, self.max_stop_ids, self.clock = admit_batch, max_stop_ids, clock
        if policy.uses_host and config.cache.num_host_blocks == 0:
            raise ValueError(f"Engine: policy preemption={policy.preemption!r}, retention="
                             f"{policy.retention!r} needs a host tier: set "
                             "CacheConfig.num_host_blocks > 0")
        self.device_ = device or jax.devices()[0]
        slots = config.scheduler.slots
        self.slot_request = np.full(slots, -1, np.int64)  # request in each slot
        self.slot_session = np.full(slots, S.NO_SESSION, np.int64)  # session of each slot
        self.host = None
        put = lambda tree: jax.device_put(tree, self.device_)
        self.params = put(params)
        if copy_completion not in transfer.COPY_COMPLETION:
            raise ValueError(f"Engine: copy_completion={copy_completion!r}, expected one of "
                             f"{transfer.COPY_COMPLETION}")
        if policy.uses_host:
            disk = None if disk_dir is None else DiskTier(
                disk_dir, owner=hashing.kv_owner(config, self.params))
            self.host = HostKV(config, policy, self.device_, self.slot_session,
                               self._sequence_tokens, disk, copy_completion)
        caching = policy.prefix_caching
        self.device = put(device_step.DeviceState(
            S.init(config, config.cache.block_size if caching else 0),
            kv_cache.create(config.model, config.cache),
            jnp.zeros((slots, config.scheduler.max_model_len), jnp.int32),
            SamplingTable.create(slots, max_stop_ids),
            *device_step.empty_block_keys(config, caching)))
        self.start = clock() if start is None else start
        self.free_blocks = config.cache.num_device_blocks - 1  # after the last step's schedule
        self.requests: dict[int, _Request] = {}
        self.sessions: dict[int, list[int]] = {}  # a session's tokens so far
        self.turns: dict[int, int] = {}  # requests seen per session
        self.session_salts: dict[int, str | None] = {}  # a session's default cache salt
        self.salt_ids: dict[str | None, int] = {None: 0}  # root tags of the salts seen
        # Per session, the last prompt hashed for prefix caching: its salt, tokens, block keys.
        self.session_keys: dict[int, tuple[str | None, list[int], np.ndarray]] = {}
        self.unfinished = 0
        self.pending: list[_Request] = []
        self.aborting: list[int] = []
        self.inflight = None  # the last dispatched step's outputs, slot owners and record
        self.ids = itertools.count()
        self.done: list[RequestOutput] = []  # outputs decided on the host, not yet returned
        # With record_steps, every step's record; a step's duration is the time to the next.
        self.step_log: list[StepRecord] | None = [] if record_steps else None
        self.step_shapes: set[device_step.StepShape] = set()  # steps run (or compiled)

    # ---------------------------------------------------------------- the online API

    def now(self) -> float:
        return self.clock() - self.start

    def add_request(self, prompt: str | Sequence[int], sampling: SamplingParams | None = None,
                    *, session_id: int | None = None, history: Sequence[int] | None = None,
                    cache_salt: str | None = None) -> int:
        """Queue a request; returns its id. ``prompt`` is text (needs a tokenizer) or token ids
        — the new tokens only, when it continues a session. ``history``: the session's tokens
        so far when they come from elsewhere (a cluster moves sessions between engines);
        default: what this engine has seen of the session. ``cache_salt``: with prefix caching,
        requests share cached blocks only with requests of the same salt (a tenant's); a
        session's salt stays its default for its later requests. A field the engine cannot
        hold raises a ``ValueError`` naming it, and nothing is queued."""
        return self._enqueue(self._request(prompt, sampling, session_id, history, cache_salt))

    def abort(self, request_id: int) -> bool:
        """End request ``request_id`` (at the next ``step`` if it is on the device). True if
        this call ends it; False if the engine has no such request or it has ended, or is
        ending, already."""
        request = self.requests.get(request_id) if validation.is_int(request_id) else None
        if request is None or request.finish_reason is not None or \
                request.request_id in self.aborting:
            return False
        if request in self.pending:
            self.pending.remove(request)
            self._finish(request, "abort")
        else:
            self.aborting.append(request.request_id)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.unfinished or self.inflight is not None or self.done)

    def step(self) -> list[RequestOutput]:
        """Admit, schedule and dispatch one step; return the tokens of the previous one."""
        self._apply_aborts()
        if self.host is not None:
            self.device = self.host.poll(self.device, self.free_blocks)
        admitted = self._admit()
        recording = self.step_log is not None
        scheduler, plan, counts, block_ids = device_step.schedule(
            self.device.scheduler, self.now(), limits=self.config.scheduler, policy=self.policy,
            record=recording)
        self.device = dataclasses.replace(self.device, scheduler=scheduler)
        counts = np.asarray(counts)
        num_seqs, num_tokens, decode, self.free_blocks = counts[:NUM_COUNTS].tolist()
        R = self.config.scheduler.slots
        record = None
        if recording:
            record = StepRecord(self.now(), *counts[-2 * R:].reshape(2, R), admitted)
            self.step_log.append(record)
        restores = None
        if self.host is not None:
            tokens, offloads, restoring = counts[NUM_COUNTS:NUM_COUNTS + 3 * R].reshape(3, -1)
            restores = self.host.dispatch(self.device, block_ids, tokens, offloads, restoring,
                                          self.slot_session != S.NO_SESSION,
                                          self.slot_request < 0)
        previous, self.inflight = self.inflight, None
        if num_seqs:
            shape = device_step.StepShape(
                *batch.shape(num_seqs, num_tokens, decode, self.config.scheduler), bool(decode),
                device_step.StepShape.of_restores(restores))
            self.step_shapes.add(shape)
            self.device, outputs = device_step.run(self.device, self.params, plan, self.now(),
                                                   restores, **self._static(shape))
            self.inflight = (outputs, self.slot_request.copy(), record)
        return self._collect(previous)

    def compile_steps(self, shapes) -> None:
        """Compile the fused step for ``shapes`` (``device_step.StepShape``s, e.g. those another
        engine met: ``step_shapes``) on this engine's device without running it, so that
        serving them later compiles nothing."""
        def spec(a, sharding=None):
            return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding or a.sharding,
                                        weak_type=a.weak_type)

        device, params = jax.tree.map(spec, (self.device, self.params))
        plan = jax.eval_shape(functools.partial(
            device_step.schedule, limits=self.config.scheduler, policy=self.policy),
            device.scheduler, 0.0)[1]
        plan = jax.tree.map(lambda a: spec(a, transfer.device_sharding(self.device_)), plan)
        for shape in set(shapes) - self.step_shapes:
            restores = device_step.padding(self.config, shape.restores, self.device_)
            device_step.run.lower(device, params, plan, 0.0, restores,
                                  **self._static(shape)).compile()
            self.step_shapes.add(shape)

    def generate(self, prompts: Sequence[str | Sequence[int]],
                 sampling: SamplingParams | Sequence[SamplingParams] | None = None,
                 ) -> list[Generation]:
        """Run ``prompts`` to completion (offline) and return them in order. At most as many
        run at once as the engine has slots; the others wait for one. A bad prompt raises a
        ``ValueError`` before any of them runs."""
        params = sampling if isinstance(sampling, Sequence) else [sampling] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"generate: {len(params)} SamplingParams for {len(prompts)} prompts")
        waiting = collections.deque(self._request(p, s, None, None, None)
                                    for p, s in zip(prompts, params))
        ids, running = [], set()
        while waiting or self.has_unfinished():
            while waiting and len(running) < self.config.scheduler.slots:
                ids.append(self._enqueue(waiting.popleft()))
                running.add(ids[-1])
            self.step()
            running = {i for i in running if self.requests[i].finish_reason is None}
        return [self.result(i) for i in ids]

    def result(self, request_id: int) -> Generation:
        r = self.requests[request_id]
        text = self.tokenizer.decode(r.output) if self.tokenizer else None
        return Generation(request_id, list(r.output), text, r.finish_reason)

    def records(self) -> metrics.RequestRecords:
        """Every request so far as ``metrics.RequestRecords`` (times in seconds since the
        engine started), for the metrics of ``symphony_jax.metrics``."""
        rs = list(self.requests.values())
        first = [r.token_times[0] if r.token_times else np.nan for r in rs]
        return metrics.RequestRecords(
            request_id=[r.request_id for r in rs], session_id=[r.session_id for r in rs],
            turn_index=[r.turn_index for r in rs], node=[0 if r.slot is not None else -1 for r in rs],
            arrival_s=[r.arrival_s for r in rs], advisory_s=[np.nan] * len(rs),
            first_token_s=first, finish_s=[r.finish_s if r.output else np.nan for r in rs],
            input_tokens=[len(r.prompt) for r in rs], output_tokens=[len(r.output) for r in rs],
            prefill_tokens=[r.computed_tokens for r in rs],
            recomputed_tokens=[r.recomputed_tokens for r in rs])

    @property
    def device_kv_bytes(self) -> int:
        """Bytes of K,V blocks in use on the device (as of the last step's schedule)."""
        return (self.config.cache.num_device_blocks - 1 - self.free_blocks) * (
            self.config.block_bytes)

    @property
    def host_kv_bytes(self) -> int:
        return self.host.tier.used_bytes if self.host is not None else 0

    # ---------------------------------------------------------------- sessions' K,V

    def _idle_slot(self, session_id: int) -> tuple[int | None, bool]:
        """The slot holding ``session_id``'s sequence (None: none), and whether it is idle (no
        request of the session running or waiting here)."""
        r = self.device.scheduler.requests
        status, sessions = jax.device_get((r.status, r.session_id))
        held = np.flatnonzero((sessions == session_id) & (status != S.EMPTY))
        if not len(held):
            return None, True
        slot = int(held[0])
        return slot, bool(status[slot] in (S.FINISHED, S.PREFETCHING)
                          and self.slot_request[slot] < 0)

    def export_session(self, session_id: int, device) -> tuple[tuple[transfer.Chunk, ...], int] | None:
        """Start copying idle ``session_id``'s K,V to ``device``'s host memory; returns the
        chunks (in flight) and the tokens they cover, or None if this engine holds none of it
        (or the session is not idle)."""
        slot, idle = self._idle_slot(session_id)
        if self.host is None or slot is None or not idle or slot in self.host.prefetching:
            return None
        cached = int(jax.device_get(self.device.scheduler.cached_tokens[slot]))
        tokens = max(cached, self.host.tier.tokens(slot))
        if tokens == 0:
            return None
        return self.host.export(self.device, slot, tokens, transfer.host_sharding(device)), tokens

    def import_session(self, session_id: int, chunks: tuple[transfer.Chunk, ...],
                       tokens: int) -> bool:
        """Take ``session_id``'s K,V (``chunks`` in this device's host memory, possibly still
        in flight, covering ``tokens`` tokens) into a slot (an empty one, else the least
        recently used idle session's, evicted): host tier first, then free blocks. Its next
        request here waits until they are in (``HostKV.busy``). False when it cannot: the
        session is active here, no slot is empty or idle, or the host tier has no room."""
        if self.host is None:
            raise ValueError("import_session: needs a host tier (a policy with uses_host)")
        slot, idle = self._idle_slot(session_id)
        if not idle:
            return False
        if slot is not None:
            self.drop_session(session_id)  # an older copy of the session
        chosen = admission.slot_to_adopt(self.device.scheduler.requests, self.slot_request < 0)
        if chosen is None:
            return False
        slot, held = chosen
        if held:
            self.drop_session(int(self.slot_session[slot]))  # the least recently used
        R = self.config.scheduler.slots
        self.device = dataclasses.replace(self.device, scheduler=tiers.adopt(
            self.device.scheduler, jnp.asarray(batch.padded([slot], R, R)),
            jnp.asarray(batch.padded([session_id], R, S.NO_SESSION)), self.now()))
        self.host.forget(slot)
        self.slot_session[slot] = session_id
        return self.host.migrate_in(slot, chunks, tokens)

    def residency(self, session_id: int) -> Residency | None:
        """Where ``session_id``'s K,V is here (None: this engine holds no sequence of it)."""
        slot, _ = self._idle_slot(session_id)
        return None if slot is None else self._residency(slot)

    def _residency(self, slot: int) -> Residency:
        tokens = jax.device_get(self.device.scheduler.blocks.num_tokens[:, slot])
        host = 0 if self.host is None else int(self.host.stored_tokens[slot])
        return Residency(tuple(int(t) for t in tokens), host)

    def prefetch_session(self, session_id: int) -> None:
        """Before idle ``session_id``'s next request, copy into free blocks the layer groups of
        its K,V that only the host tier holds, lower layers first (``tiers.prefetch``): the
        node manager's fill for a session placed where its K,V already is."""
        slot, idle = self._idle_slot(session_id)
        if self.host is None or slot is None or not idle or slot in self.host.prefetching:
            return
        where = self._residency(slot)
        if where.host_tokens > 0 and 0 in where.device_tokens:
            self.host.to_prefetch.add(slot)

    def drop_session(self, session_id: int) -> bool:
        """Free idle ``session_id``'s K,V here (device and host tier); False if the session has
        a request here."""
        slot, idle = self._idle_slot(session_id)
        if slot is None or not idle:
            return slot is None
        R = self.config.scheduler.slots
        self.device = dataclasses.replace(self.device, scheduler=admission.abort(
            self.device.scheduler, jnp.asarray(batch.padded([slot], R, R))))
        self.slot_session[slot] = S.NO_SESSION
        if self.host is not None:
            self.host.forget(slot)
        return True

    def settle_imports(self) -> None:
        """Wait until K,V migrated in is on the device, or in the host tier where no blocks
        were free (migrations that take no time: the oracle)."""
        if self.host is None:
            return
        while True:
            self.device = self.host.poll(self.device, self.free_blocks)
            copies = [c for c in self.host.offloading if c.migrated] + [
                self.host.loading[s] for s in self.host.prefetching]
            if not copies:
                return
            for copy in copies:
                copy.transfer.wait()

    # ---------------------------------------------------------------- internals

    def _request(self, prompt, sampling, session_id, history, cache_salt) -> _Request:
        """A request of these fields, checked (see ``add_request``) but not queued: it takes no
        id, turn or session state until ``_enqueue``."""
        vocab = self.config.model.vocab_size
        sampling = validation.sampling(sampling, vocab, self.eos_token_ids, self.max_stop_ids,
                                     "add_request")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("add_request: a text prompt needs the engine's tokenizer")
            prompt = self.tokenizer.encode(prompt)
        new = validation.token_ids(prompt, vocab, "add_request: prompt")
        session = S.NO_SESSION if session_id is None else validation.session_id(session_id,
                                                                              "add_request")
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise ValueError(f"add_request: cache_salt={cache_salt!r}, expected None or a str")
        if session != S.NO_SESSION and cache_salt is None:
            cache_salt = self.session_salts.get(session)
        history = self.sessions.get(session, []) if history is None else validation.token_ids(
            history, vocab, "add_request: history", empty=True)
        return _Request(-1, history + new, max(len(history) - 1, 0), sampling, session, -1,
                        float("nan"), cache_salt)

    def _enqueue(self, request: _Request) -> int:
        """Give ``request`` (from ``_request``) its id, turn and arrival, and queue it (or
        reject it now if it can never fit)."""
        request.request_id, request.arrival_s = next(self.ids), self.now()
        session = request.session_id
        request.turn_index = self.turns.get(session, 0)
        self.turns[session] = request.turn_index + 1
        if session != S.NO_SESSION:
            self.session_salts[session] = request.cache_salt
        self.requests[request.request_id] = request
        self.unfinished += 1
        if len(request.prompt) + request.sampling.max_tokens > self.config.scheduler.max_model_len:
            self._finish(request, f"rejected: {S.REASONS[S.TOO_LONG]}")
        else:
            self.pending.append(request)
        return request.request_id

    def _sequence_tokens(self, slot: int) -> list[int]:
        """The token ids of ``slot``'s sequence known so far (its request's, or its idle
        session's)."""
        request_id = int(self.slot_request[slot])
        if request_id >= 0:
            request = self.requests[request_id]
            return request.prompt + request.output
        return self.sessions.get(int(self.slot_session[slot]), [])

    def _finish(self, request: _Request, reason: str) -> None:
        request.finish_reason, request.finish_s = reason, self.now()
        self.unfinished -= 1
        if request.slot is not None and self.slot_request[request.slot] == request.request_id:
            self.slot_request[request.slot] = -1
        if request.session_id != S.NO_SESSION and not reason.startswith("rejected"):
            self.sessions[request.session_id] = request.prompt + request.output
        self.done.append(RequestOutput(request.request_id, [], True, reason))

    def _static(self, shape: device_step.StepShape) -> dict:
        """``device_step.run``'s static arguments for a step of ``shape``."""
        return dict(num_seqs=shape.num_seqs, num_tokens=shape.num_tokens, decode=shape.decode,
                    config=self.config, policy=self.policy, impl=self.impl)

    def _apply_aborts(self) -> None:
        slots = [self.requests[i].slot for i in self.aborting]
        if not slots:
            return
        R = self.config.scheduler.slots
        self.device = dataclasses.replace(self.device, scheduler=admission.abort(
            self.device.scheduler, jnp.asarray(batch.padded(slots, R, R))))
        for slot in slots:
            self.slot_session[slot] = S.NO_SESSION
            if self.host is not None:
                self.host.forget(slot)
        for request_id in self.aborting:
            self._finish(self.requests[request_id], "abort")
        self.aborting = []

    def _held(self, request: _Request) -> bool:
        """Whether K,V migrated for the request's session is still on its way in."""
        if self.host is None or request.session_id == S.NO_SESSION:
            return False
        return any(self.host.busy(int(slot))
                   for slot in np.flatnonzero(self.slot_session == request.session_id))

    def _admit(self) -> int:
        """Admit what waits (up to ``admit_batch`` requests); returns how many it took in."""
        taken, held = [], []
        for r in self.pending:
            (held if len(taken) == self.admit_batch or self._held(r) else taken).append(r)
        self.pending = held
        batch, rows = [], []
        for r in taken:
            try:
                rows.append(self._admission_row(r))
            except (ValueError, OverflowError, TypeError) as e:  # alone, not its batch
                self._finish(r, f"rejected: {e}")
            else:
                batch.append(r)
        if not batch:
            return len(taken)
        n = self.admit_batch
        prompts = np.zeros((n, self.config.scheduler.max_model_len), np.int32)
        keys = np.zeros((n, *self.device.block_keys.shape[1:]), np.uint32)
        roots = np.zeros(n, np.uint32)
        for i, (prompt, block_keys, root, _) in enumerate(rows):
            prompts[i, :len(prompt)], keys[i], roots[i] = prompt, block_keys, root
        padding = SamplingTable.rows([], [], (), self.max_stop_ids, n - len(batch))
        sampling = jax.tree.map(lambda *column: np.concatenate(column),
                                *[row[3] for row in rows], padding)
        new = S.new_requests(
            [r.request_id for r in batch], [len(r.prompt) for r in batch],
            [r.sampling.max_tokens for r in batch], session_id=[r.session_id for r in batch],
            history_len=[r.history_len for r in batch], arrival=[r.arrival_s for r in batch],
            size=n)
        self.device, slots, reasons = device_step.admit(self.device, new, jnp.asarray(prompts),
                                                        sampling, keys, roots,
                                                        config=self.config, policy=self.policy)
        slots, reasons = jax.device_get((slots, reasons))
        admitted = []
        for r, slot, reason in zip(batch, slots, reasons):
            if reason == S.ADMITTED:
                r.slot = int(slot)
                self.slot_request[slot] = r.request_id
                if self.host is not None and (r.session_id == S.NO_SESSION
                                              or self.slot_session[slot] != r.session_id):
                    self.host.forget(slot)  # the slot's last sequence is gone
                self.slot_session[slot] = r.session_id
                admitted.append(r)
            else:
                self._finish(r, f"rejected: {S.REASONS[reason]}")
        if self.host is not None:
            self.device = self.host.admitted(self.device, [(r.slot, r.prompt) for r in admitted])
        return len(taken)

    def _admission_row(self, r: _Request) -> tuple[np.ndarray, np.ndarray, np.uint32,
                                                   SamplingTable]:
        """``device_step.admit``'s row of ``r``: its prompt (i32, unpadded), block keys, salt's
        root tag and sampling row (a one-row ``SamplingTable``)."""
        prompt = np.asarray(r.prompt, np.int32)
        seed = r.request_id if r.sampling.seed is None else r.sampling.seed
        sampling = SamplingTable.rows([r.sampling], [seed], self.eos_token_ids,
                                      self.max_stop_ids, 1)
        return (prompt, *self._block_keys(r), sampling)

    def _block_keys(self, r: _Request) -> tuple[np.ndarray, np.uint32]:
        """``r``'s row of ``device_step.admit``'s ``keys`` and ``roots``: its prompt's root key
        and full blocks' keys (hashed here, a session's blocks once), and its salt's root tag
        (zeros without prefix caching)."""
        keys = np.zeros(self.device.block_keys.shape[1:], np.uint32)
        if not self.policy.prefix_caching:
            return keys, np.uint32(0)
        root = hashing.root_key(r.cache_salt)
        salt, tokens, known = self.session_keys.get(r.session_id, (None, [], None))
        same = salt == r.cache_salt and r.prompt[:len(tokens)] == tokens
        full = hashing.prompt_keys(r.prompt, self.config.cache.block_size, root,
                                   known if same else None)
        if r.session_id != S.NO_SESSION:
            self.session_keys[r.session_id] = (r.cache_salt, r.prompt, full)
        keys[0], keys[1:1 + len(full)] = root, full
        salt_id = self.salt_ids.setdefault(r.cache_salt, len(self.salt_ids))
        return keys, np.uint32(prefix_cache.root_tag(salt_id))

    def _collect(self, inflight) -> list[RequestOutput]:
        """Outputs of a dispatched step (already complete or nearly), and host decisions."""
        outputs, self.done = self.done, []
        if inflight is None:
            return outputs
        step_outputs, owners, record = inflight
        sequences, counters = jax.device_get((step_outputs.sequences, step_outputs.counters))
        now = self.now()
        if record is not None:
            record.reported_s = now
        for slot, token, sampled in sequences[[SLOT, TOKEN, SAMPLED]].T.tolist():
            if sampled and slot < len(owners) and owners[slot] >= 0:
                request = self.requests[int(owners[slot])]
                if request.finish_reason is None:  # an abort may have overtaken the step
                    request.output.append(token)
                    request.token_times.append(now)
                    outputs.append(RequestOutput(request.request_id, [token]))
        self._account(owners, counters)
        for slot in sequences[SLOT, sequences[FINISHED] == 1]:
            request = self.requests[int(owners[slot])]
            if request.finish_reason is None:
                stops = set(request.sampling.stop_token_ids) | (
                    set() if request.sampling.ignore_eos else set(self.eos_token_ids))
                reason = "stop" if request.output[-1] in stops else "length"
                self._finish(request, reason)
        outputs.extend(self.done)
        self.done = []
        return outputs

    def _account(self, owners: np.ndarray, counters: np.ndarray) -> None:
        """Copy the scheduler's per-request token counts after a step (``StepOutputs.counters``)
        to the host records."""
        ids, cached, computed, recomputed = counters[[REQUEST, CACHED, COMPUTED, RECOMPUTED]]
        for slot in np.flatnonzero(owners >= 0):
            request = self.requests[int(owners[slot])]
            if ids[slot] == request.request_id:
                request.cached_tokens = int(cached[slot])
                request.computed_tokens = int(computed[slot])
                request.recomputed_tokens = int(recomputed[slot])
