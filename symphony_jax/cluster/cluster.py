"""A cluster of serving nodes in one process, driven by one controller thread.

A node is one JAX device with its own engine (scheduler, model, K,V pool and host tier); on CPU
the devices are fake (``--xla_force_host_platform_device_count``), and with fewer devices than
nodes, nodes share devices. ``step`` steps every live node once: each engine dispatches its step
asynchronously and collects the previous one, so the devices run concurrently.

The API is the advisory API: ``submit(session_id, new_tokens, sampling)`` sends a session's next
request (queued behind the session's running one, if any), ``advise(session_id, ...)`` says one
is coming. Hints are non-binding: a missing, late, false, duplicated or unknown-session
advisory only costs time or memory. Under a system with ``hints="migrate"``, the node manager
of SYMPHONY runs here for each advisory, at the next ``step``: the global scheduler picks the
node, the session's K,V is copied from the node holding it (its host tier or its device) to
that node's host memory (``jax.device_put`` across devices, asynchronously), then into free
blocks there; the source lets its copy go once the destination's is complete. A request
arriving before that waits on its node for the copy it needs, and nothing else does.

``remove_node`` takes a node away mid-run: its sessions' K,V is lost (their next turns
recompute), its unfinished requests start again on other nodes (each finishes once), and
migrations from it are cancelled (the destination recomputes).
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from symphony_jax import metrics
from symphony_jax.cluster.global_scheduler import GlobalScheduler, KVLocation
from symphony_jax.cluster.records import ClusterRecords, step_records, transfer_records
from symphony_jax.cluster.systems import System, node_engine, system as get_system
from symphony_jax.config import EngineConfig, _check_ints
from symphony_jax.engine import validation
from symphony_jax.engine.engine import Engine, Residency
from symphony_jax.engine.sampling import SamplingParams
from symphony_jax.memory import transfer
from symphony_jax.model.params import LlamaParams


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """``num_nodes`` nodes, each an engine of ``engine`` (pools scaled by the system's
    ``memory_scale``) on ``devices[i % len(devices)]`` (default: ``jax.devices()``)."""

    engine: EngineConfig
    num_nodes: int = 2
    devices: tuple | None = None

    def __post_init__(self):
        if not isinstance(self.engine, EngineConfig):
            raise ValueError(f"ClusterConfig.engine={self.engine!r}: expected an EngineConfig")
        _check_ints(self, 1, "num_nodes")
        if self.devices is not None and not len(self.devices):
            raise ValueError("ClusterConfig.devices: expected None or at least one device")

    def node_engine(self, system: System) -> EngineConfig:
        return node_engine(self.engine, system)


@dataclasses.dataclass
class Node:
    index: int
    device: object
    engine: Engine
    alive: bool = True


@dataclasses.dataclass
class _Request:
    request_id: int
    session_id: int
    turn_index: int
    new_tokens: list[int]
    sampling: SamplingParams
    arrival_s: float
    advisory_s: float
    node: int = -1
    engine_id: int = -1  # its id on its node's engine
    prefill_estimate: int = 0  # prompt tokens it was expected to compute there
    output: list[int] = dataclasses.field(default_factory=list)
    token_times: list[float] = dataclasses.field(default_factory=list)
    finish_s: float = float("nan")
    finish_reason: str | None = None
    attempts: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (node, id)


@dataclasses.dataclass
class _Migration:
    session_id: int
    src: int
    dst: int
    chunks: tuple[transfer.Chunk, ...]
    start_s: float
    request_id: int = -1  # the request it prepared (the session's next)
    end_s: float = float("nan")

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.chunks)


class Cluster:
    def __init__(self, config: ClusterConfig, system: str | System, params: LlamaParams, *,
                 clock: Callable[[], float] = time.monotonic, copy_completion: str = "polled",
                 **engine_kwargs):
        """``engine_kwargs`` go to every node's ``Engine`` (``impl``, ``eos_token_ids``, ...).
        ``copy_completion`` (``Engine``'s) also decides when a migration counts as complete:
        ``"next_step"``, at the step after it started (with a deterministic ``clock``, a run is
        then reproducible)."""
        self.config, self.system = config, get_system(system)
        self.copy_completion = copy_completion
        self.base_clock, self.paused = clock, 0.0
        self.start = self._clock()
        devices = config.devices or tuple(jax.devices())
        engine = config.node_engine(self.system)
        self.nodes = [Node(i, devices[i % len(devices)], Engine(
            engine, params, policy=self.system.policy, device=devices[i % len(devices)],
            clock=self._clock, start=self.start, copy_completion=copy_completion,
            **engine_kwargs))
            for i in range(config.num_nodes)]
        self.scheduler = GlobalScheduler(self.system, config.num_nodes,
                                         step_tokens=engine.scheduler.max_num_batched_tokens,
                                         step_seqs=engine.scheduler.max_num_seqs)
        self.requests: dict[int, _Request] = {}
        self.by_engine: dict[tuple[int, int], _Request] = {}
        self.history: dict[int, list[int]] = {}  # each session's tokens so far
        self.turns: dict[int, int] = collections.Counter()
        self.running: dict[int, _Request] = {}  # each session's request in service
        self.queued: dict[int, collections.deque] = collections.defaultdict(collections.deque)
        self.advisories: list[tuple[int, float, float, int]] = []  # to handle at the next step
        self.migrations: list[_Migration] = []
        self.done_migrations: list[_Migration] = []
        self.unclaimed: dict[int, list[_Migration]] = {}  # per session, before its next request
        self.steps: list[tuple[float, int, int, int, int]] = []
        self.token_log: list[tuple[int, float]] = []
        self.next_id = 0

    # ---------------------------------------------------------------- time

    def _clock(self) -> float:
        return self.base_clock() - self.paused

    def now(self) -> float:
        return self._clock() - self.start

    # ---------------------------------------------------------------- the advisory API

    def advise(self, session_id: int, expected_arrival: float | None = None,
               priority: int = 0) -> None:
        """A request of ``session_id`` is coming (at ``expected_arrival``, seconds on the
        cluster's clock, if known). Handled at the next ``step``, lower ``priority`` and then
        earlier expected arrival first."""
        session_id = validation.session_id(session_id, "advise")
        if expected_arrival is not None and not np.isfinite(expected_arrival):
            raise ValueError(f"advise: expected_arrival={expected_arrival!r}: expected a finite "
                             "time or None")
        if isinstance(priority, bool) or not isinstance(priority, (int, np.integer)):
            raise ValueError(f"advise: priority={priority!r}: expected an integer")
        self.scheduler.note_advisory(session_id, self.now())
        arrival = np.inf if expected_arrival is None else float(expected_arrival)
        self.advisories.append((int(priority), arrival, len(self.advisories), session_id))

    def submit(self, session_id: int, new_tokens: Sequence[int],
               sampling: SamplingParams | None = None) -> int:
        """Send the next request of ``session_id`` (``new_tokens``: the tokens it adds);
        returns its id. Queued behind the session's request in service, if any."""
        session_id = validation.session_id(session_id, "submit")
        engine = self.nodes[0].engine
        tokens = validation.token_ids(new_tokens, self.config.engine.model.vocab_size,
                                      "submit: new_tokens")
        sampling = validation.sampling(sampling, self.config.engine.model.vocab_size,
                                       engine.eos_token_ids, engine.max_stop_ids, "submit")
        request = _Request(self.next_id, session_id, self.turns[session_id], tokens, sampling,
                           self.now(), self.scheduler.advisory_time(session_id, self.now()))
        self.next_id += 1
        self.turns[session_id] += 1
        self.requests[request.request_id] = request
        if session_id in self.running:
            self.queued[session_id].append(request)
        else:
            self._dispatch(request)
        return request.request_id

    def where(self, session_id: int) -> tuple[int, Residency] | None:
        """The node holding ``session_id``'s K,V (the global scheduler's table) and where it
        is there: device tokens per layer group, host tokens. None if no live node holds it."""
        node = self.scheduler.kv_node(validation.session_id(session_id, "where"), self.now())
        residency = None if node < 0 else self.nodes[node].engine.residency(session_id)
        return None if residency is None else (node, residency)

    def has_unfinished(self) -> bool:
        return bool(self.running) or any(n.engine.has_unfinished() for n in self.live_nodes)

    @property
    def live_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.alive]

    def step(self) -> list[int]:
        """Handle advisories, step every live node once, and apply what completed; returns the
        requests that ended (finished, aborted or rejected)."""
        self._handle_advisories()
        self._poll_migrations()
        ended = []
        for node in self.live_nodes:
            for out in node.engine.step():
                request = self.by_engine.get((node.index, out.request_id))
                if request is None or request.node != node.index:
                    continue  # superseded by a restart elsewhere
                if out.new_token_ids:
                    self._tokens(request, out.new_token_ids)
                if out.finished:
                    self._end(request, out.finish_reason)
                    ended.append(request.request_id)
        now = self.now()
        load = collections.Counter(r.node for r in self.running.values())
        for node in self.live_nodes:
            self.steps.append((now, node.index, load[node.index], node.engine.device_kv_bytes,
                               node.engine.host_kv_bytes))
        return ended

    def compile_steps(self) -> None:
        """Compile on every node the steps any node ran (``Engine.compile_steps``), so that a
        node meeting one of them first later (in this cluster or another on the same devices)
        does not compile it while serving."""
        shapes = set().union(*(node.engine.step_shapes for node in self.nodes))
        for node in self.nodes:
            node.engine.compile_steps(shapes)

    def remove_node(self, index: int) -> bool:
        """Take node ``index`` away now (see the module doc); False if it was gone already."""
        index = self.scheduler.node_index(index, "remove_node")
        node = self.nodes[index]
        if not node.alive:
            return False
        if len(self.live_nodes) == 1:
            raise ValueError(f"remove_node({index}): it is the last live node")
        node.alive = False
        self.scheduler.remove(index)
        for m in list(self.migrations):
            if index in (m.src, m.dst):
                self.migrations.remove(m)
                if m.dst != index:
                    self.nodes[m.dst].engine.drop_session(m.session_id)
                    self.scheduler.where.pop(m.session_id, None)
        for request in [r for r in self.running.values() if r.node == index]:
            self.scheduler.ended(index, request.prefill_estimate, bool(request.output))
            request.output, request.token_times = [], []
            self._dispatch(request)
        return True

    # ---------------------------------------------------------------- records

    def records(self) -> ClusterRecords:
        rs = sorted(self.requests.values(), key=lambda r: r.request_id)
        computed = [self._counts(r) for r in rs]
        finished = [r.finish_reason in ("stop", "length") for r in rs]
        requests = metrics.RequestRecords(
            request_id=[r.request_id for r in rs], session_id=[r.session_id for r in rs],
            turn_index=[r.turn_index for r in rs], node=[r.node for r in rs],
            arrival_s=[r.arrival_s for r in rs], advisory_s=[r.advisory_s for r in rs],
            first_token_s=[r.token_times[0] if r.token_times else np.nan for r in rs],
            finish_s=[r.finish_s if done else np.nan for r, done in zip(rs, finished)],
            input_tokens=[len(r.new_tokens) + len(self._history_of(r)) for r in rs],
            output_tokens=[len(r.output) for r in rs],
            prefill_tokens=[c[0] for c in computed], recomputed_tokens=[c[1] for c in computed])
        ids, times = zip(*self.token_log) if self.token_log else ((), ())
        return ClusterRecords(
            requests, metrics.TokenRecords(request_id=list(ids), time_s=list(times)),
            step_records(self.steps), transfer_records(self.done_migrations + self.migrations),
            tuple(tuple(r.output) for r in rs))

    # ---------------------------------------------------------------- internals

    def _history_of(self, request: _Request) -> list[int]:
        engine_request = self._engine_request(request)
        if engine_request is None:
            return []
        return engine_request.prompt[: len(engine_request.prompt) - len(request.new_tokens)]

    def _engine_request(self, request: _Request):
        if request.node < 0:
            return None
        return self.nodes[request.node].engine.requests.get(request.engine_id)

    def _counts(self, request: _Request) -> tuple[int, int]:
        """Prompt tokens computed and history tokens recomputed, over every attempt."""
        prefill = recomputed = 0
        for node, engine_id in request.attempts:
            r = self.nodes[node].engine.requests[engine_id]
            prefill, recomputed = prefill + r.computed_tokens, recomputed + r.recomputed_tokens
        return prefill, recomputed

    def _dispatch(self, request: _Request) -> None:
        """Place a session's request and send it to its node."""
        session, now = request.session_id, self.now()
        node = self.scheduler.place(session, now, self._moving(session))
        if self.system.fetch_on_request:
            self._migrate(session, node)
        for m in self.unclaimed.pop(session, []):  # moved for it, before or now
            m.request_id = request.request_id
        history = self.history.get(session, [])
        request.node = node
        request.prefill_estimate = len(history) + len(request.new_tokens) - \
            self.scheduler.kept_tokens(session, node, now)
        request.engine_id = self.nodes[node].engine.add_request(
            request.new_tokens, request.sampling, session_id=session, history=history)
        request.attempts.append((node, request.engine_id))
        self.by_engine[(node, request.engine_id)] = request
        self.running[session] = request
        self.scheduler.started(node, request.prefill_estimate)

    def _tokens(self, request: _Request, tokens: list[int]) -> None:
        now = self.now()
        if not request.output:
            self.scheduler.first_token(request.node, request.prefill_estimate)
        request.output += tokens
        request.token_times += [now] * len(tokens)
        self.token_log += [(request.request_id, now)] * len(tokens)

    def _end(self, request: _Request, reason: str) -> None:
        session, now = request.session_id, self.now()
        request.finish_reason, request.finish_s = reason, now
        self.scheduler.ended(request.node, request.prefill_estimate, bool(request.output))
        del self.running[session]
        if not reason.startswith("rejected") and reason != "abort":
            engine_request = self._engine_request(request)
            self.history[session] = engine_request.prompt + request.output
            self.scheduler.kept(session, request.node, len(self.history[session]) - 1, now)
        if self.queued[session]:
            self._dispatch(self.queued[session].popleft())

    def _handle_advisories(self) -> None:
        pending, self.advisories = sorted(self.advisories), []
        if self.system.hints != "migrate":
            return
        for _, _, _, session in pending:
            if session in self.running:
                continue  # its K,V is in use; the request will follow it
            self._migrate(session, self.scheduler.advise(session, self.now()))

    def _migrate(self, session: int, dst: int) -> None:
        """Start moving ``session``'s K,V to node ``dst`` if another live node holds it; if
        ``dst`` does, bring what its host tier alone holds into free blocks there."""
        now = self.now()
        src = self.scheduler.kv_node(session, now)
        if src == dst:
            self.nodes[dst].engine.prefetch_session(session)
        if src < 0 or src == dst or self._moving(session):
            return
        exported = self.nodes[src].engine.export_session(session, self.nodes[dst].device)
        if exported is None:
            return
        chunks, tokens = exported
        if not self.nodes[dst].engine.import_session(session, chunks, tokens):
            return
        migration = _Migration(session, src, dst, chunks, now)
        self.unclaimed.setdefault(session, []).append(migration)
        self.scheduler.where[session] = KVLocation(dst, tokens)
        if self.system.free_migration:
            t0 = self.base_clock()
            jax.block_until_ready([(c.k, c.v) for c in chunks])
            self.nodes[dst].engine.settle_imports()
            self.paused += self.base_clock() - t0
            self._complete(migration)
        else:
            self.migrations.append(migration)

    def _moving(self, session: int) -> bool:
        """Whether a copy of ``session``'s K,V is in flight."""
        return any(m.session_id == session for m in self.migrations)

    def _poll_migrations(self) -> None:
        for m in [m for m in self.migrations
                  if transfer.Transfer(m.chunks).complete(self.copy_completion)]:
            self.migrations.remove(m)
            self._complete(m)

    def _complete(self, m: _Migration) -> None:
        m.end_s = self.now()
        self.nodes[m.src].engine.drop_session(m.session_id)
        self.done_migrations.append(m)

