"""A discrete-event simulator of a cluster, on the real scheduler and placement policies.

``simulate(schedule, system, config, cost)`` serves a workload schedule the way ``cluster.run``
does, with simulated nodes (``sim.node``: the engine's jitted scheduler state machine, a cost
model instead of the model) and simulated links (``sim.network``: each node's PCIe link,
network interface and disk, bandwidth shared by concurrent flows). The global scheduler,
placements, systems and advisory handling are the real cluster's (``symphony_jax.cluster``),
and the result is the same ``ClusterRecords`` (without per-token times), so the metrics and
figures work on either.

Events: arrivals and advisories (the schedule's, and those its closed loop triggers when a
request finishes), flow completions, and nodes' reports (first tokens, finishes, copies
started), each applied at its time. Nodes step independently: the node whose next step starts
first runs steps back to back, in one jitted call, up to the *horizon* — the next event that
could change it, and no later than any other node's clock plus the schedule's reaction time
(the least delay between a finish and what it triggers), since a finish elsewhere could send
this node a request no earlier. Events that change no node are *notes*, applied in time order
without bounding horizons: first tokens and finishes (they change the global scheduler's
counts, read only by later events), a copy's start (it changes only its own node's flows), and
advisories of systems that do not act on them; a node's horizon counts only the flows that
can change its own. So no node ever starts a step after an event that could change it: the
decisions are the ones a node stepping in lockstep with the others would make, however long
the runs.

A system with ``disk_tier`` on nodes with one keeps what its host tiers evict on the node's
disk (``SimNode._spill``, as ``engine.host_kv``); a session's K,V that only a disk holds (or
holds more of) is read back into the host tier of the node its request goes to, crossing that
disk (and both network interfaces, from another node), when its advisory picks the node or,
without one, when the request comes; the request waits for it. The engine reads its disk tier
only when the session's request is admitted on the node holding it; ``System.disk_tier`` is not
wired to the real cluster.

A node whose steps ahead only decode (``node.advance`` forecasts them: no request finishes,
nothing is preempted or expires) is *parked* until the first that could report: events
elsewhere pass it by, since its steps neither change nor read anything outside it. An event
that reads or changes a parked node first runs its steps up to the event's time (``_at``);
reading what those steps leave alone (an idle session's K,V) needs no such run. Every event
would otherwise stop every node, each stop a jitted call.

Migration under ``hints="migrate"`` or ``fetch_on_request``: the session's K,V moves from the
node holding it (its host tier or device) over both nodes' network interfaces into the
destination's host tier, then over its PCIe link into free blocks; ``free_migration`` makes
both instant.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import math

import numpy as np

from symphony_jax import metrics
from symphony_jax.cluster.global_scheduler import GlobalScheduler, KVLocation
from symphony_jax.cluster.records import ClusterRecords, step_records, transfer_records
from symphony_jax.cluster.systems import System, node_engine, system as get_system
from symphony_jax.config import (CacheConfig, EngineConfig, ModelConfig, SchedulerConfig,
                                 _check_ints, _check_positive_floats, _fail)
from symphony_jax.progress import bar as progress_bar
from symphony_jax.sim.cost_model import Geometry
from symphony_jax.sim.hardware import GPU
from symphony_jax.sim.network import Network
from symphony_jax.sim.node import SimNode, SimRequest, Stretch
from symphony_jax.workloads.schedule import ARRIVAL, Events, Schedule

REPORT, ADVISORY, ARRIVING = 0, 1, 2  # event kinds; at equal times in this order


@dataclasses.dataclass(frozen=True)
class SimConfig:
    """``num_nodes`` nodes, each with ``engine``'s scheduler and pools (scaled by the system's
    ``memory_scale``), a PCIe link of ``pcie_bandwidth`` and a network interface of
    ``nic_bandwidth`` (bytes/s, shared by both directions), and a disk tier of ``disk_bytes``
    (0: none) read and written at ``disk_bandwidth`` in all, for systems that use one. A
    migration between nodes takes ``migration_latency_s`` before its bytes move (dispatch, RPC,
    noticing its end), on top of their time on the links."""

    engine: EngineConfig
    num_nodes: int = 2
    pcie_bandwidth: float = 25e9
    nic_bandwidth: float = 12.5e9
    disk_bytes: float = 0.0
    disk_bandwidth: float = 2e9
    migration_latency_s: float = 0.0

    def __post_init__(self):
        if not isinstance(self.engine, EngineConfig):
            _fail(self, "engine", self.engine, "an EngineConfig")
        _check_ints(self, 1, "num_nodes")
        _check_positive_floats(self, "pcie_bandwidth", "nic_bandwidth", "disk_bandwidth")
        for field in ("disk_bytes", "migration_latency_s"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not 0 <= value < math.inf:
                _fail(self, field, value, "a finite number >= 0")

    @classmethod
    def for_gpu(cls, model: ModelConfig, gpu: GPU, scheduler: SchedulerConfig, *,
                num_nodes: int = 2, block_size: int = 16, memory_utilization: float = 0.9,
                host_fraction: float = 1.0, host_bytes: float | None = None,
                disk_bytes: float = 0.0, disk_bandwidth: float = 2e9) -> SimConfig:
        """Nodes of one ``gpu`` each serving ``model``: K,V blocks in the memory left after
        the weights (``memory_utilization`` of the GPU's), a host tier of ``host_bytes`` (else
        ``host_fraction`` times as many blocks as the device), the GPU's links, a disk tier."""
        geometry = Geometry.of(model)
        block_bytes = model.kv_bytes_per_token() * block_size
        free = gpu.memory_bytes * memory_utilization - geometry.weight_bytes
        if free < block_bytes * (scheduler.max_model_len // block_size + 1):
            raise ValueError(f"SimConfig.for_gpu: {model} leaves {free / 2**30:.1f} GiB of a "
                             f"{gpu.name} for K,V, less than one sequence of max_model_len="
                             f"{scheduler.max_model_len}")
        blocks = int(free // block_bytes)
        cache = CacheConfig(block_size=block_size, num_device_blocks=blocks + 1,
                            num_host_blocks=int(host_fraction * blocks if host_bytes is None
                                                else host_bytes // block_bytes))
        return cls(EngineConfig(model, cache, scheduler), num_nodes, gpu.pcie_bandwidth,
                   gpu.nic_bandwidth, disk_bytes, disk_bandwidth)


@dataclasses.dataclass
class _Migration:
    session_id: int
    src: int
    dst: int
    nbytes: int
    start_s: float
    request_id: int = -1
    end_s: float = math.nan


def _first_time(heap: list[tuple]) -> float:
    """When a heap of timed entries has its first (inf: empty)."""
    return heap[0][0] if heap else math.inf


def reaction_s(schedule: Schedule) -> float:
    """The least delay between a request's finish and an event it triggers (inf: none)."""
    rows = np.arange(schedule.num_rows)
    events = schedule.after_finish(rows, np.zeros(len(rows)))
    return float(events.time_s.min()) if len(events) else math.inf


class Simulator:
    def __init__(self, schedule: Schedule, system: str | System, config: SimConfig, cost):
        if not isinstance(schedule, Schedule):
            raise ValueError(f"simulate: schedule={schedule!r}: expected a workloads Schedule")
        if not (all(callable(getattr(cost, name, None)) for name in ("step_time", "run_times"))
                and all(isinstance(getattr(cost, name, None), (int, float))
                        for name in ("admission_s", "report_s"))):
            raise ValueError(f"simulate: cost={cost!r}: expected a cost model with step_time, "
                             "run_times, admission_s and report_s (sim.cost_model)")
        self.schedule, self.system, self.config = schedule, get_system(system), config
        engine = node_engine(config.engine, self.system)
        self.free = self.system.free_migration
        links = {}
        for i in range(config.num_nodes):
            links[f"pcie{i}"] = config.pcie_bandwidth
            links[f"nic{i}"] = config.nic_bandwidth
            links[f"disk{i}"] = config.disk_bandwidth
        self.network = Network(links)
        disk = config.disk_bytes if self.system.disk_tier else 0.0
        self.nodes = [SimNode(i, engine, self.system.policy, cost, self._launch, disk)
                      for i in range(config.num_nodes)]
        self.scheduler = GlobalScheduler(self.system, config.num_nodes,
                                         step_tokens=engine.scheduler.max_num_batched_tokens,
                                         step_seqs=engine.scheduler.max_num_seqs)
        self.reaction = reaction_s(schedule)
        self.events: list[tuple[float, int, int, object]] = []  # those that can change a node
        self.notes: list[tuple[float, int, int, object]] = []  # those that cannot (``_report``)
        self.arrivals_due: collections.Counter = collections.Counter()  # by session
        self.ending: dict[int, float] = {}  # sessions' pending end reports among the notes
        self.serial = 0
        self.requests: dict[int, SimRequest] = {}  # by schedule row
        self.history: dict[int, int] = {}  # each session's tokens so far
        self.running: dict[int, SimRequest] = {}
        self.queued: dict[int, collections.deque] = collections.defaultdict(collections.deque)
        self.migrating: dict[int, _Migration] = {}  # by session
        self.migrations: list[_Migration] = []
        self.unclaimed: dict[int, list[_Migration]] = {}
        self.steps: list[tuple[float, int, int, int, int]] = []
        self.ended = 0

    # ------------------------------------------------------------ the loop

    def run(self, until_s: float = math.inf, progress: bool = False) -> ClusterRecords:
        """Serve the schedule until every request ended, or until ``until_s`` (simulated s)."""
        self._push(self.schedule.initial_events())
        bar = progress_bar(self.schedule.num_rows, progress)
        while self.ended < self.schedule.num_rows:
            ready = [n for n in self.nodes if n.busy and not n.idle and not n.waiting_on]
            due = {n.index: self._due(n) for n in ready}
            node = min(ready, key=lambda n: due[n.index], default=None)
            t_change = _first_time(self.events)
            t_event = min(t_change, self.network.next_completion(), _first_time(self.notes))
            if min(t_event, due[node.index] if node else math.inf) >= until_s:
                break
            # A parked node runs before what happens at its due time (a flow it waits for).
            if node is None or t_event <= node.clock or t_event < due[node.index]:
                if t_event == math.inf:
                    raise RuntimeError(self._stuck())
                before = self.ended
                self._handle(t_event)
                bar.update(self.ended - before)
                continue
            # What a finish triggers comes ``reaction`` after it, at the earliest: a finish is
            # no earlier than the other nodes' clocks or a note not yet applied.
            others = min([due[n.index] for n in ready if n is not node]
                         + [_first_time(self.notes)])
            self._step(node, min(t_change, others + self.reaction,
                                 self.network.next_completion(node.links)))
        if until_s < math.inf:  # parked nodes' progress up to the end, for the records
            for node in self.nodes:
                self._at(node.index, until_s)
        bar.close()
        return self.records()

    def _due(self, node: SimNode) -> float:
        """When ``node`` must step next: at its clock, or later while it is *parked* — left
        alone, it only decodes and reports nothing until ``parked_until``, and no flow that
        could change it ends before. Events before then need not stop it: one that reads or
        changes it first runs its steps up to the event (``_at``)."""
        parked = node.parked_until
        if parked <= node.clock:
            return node.clock
        return max(node.clock, min(parked, self.network.next_completion(node.links)))

    def _at(self, index: int, t: float) -> SimNode:
        """Node ``index`` at ``t``: a parked one's steps before ``t`` run now (they report
        nothing), before an event at ``t`` reads or changes it."""
        node = self.nodes[index]
        if node.clock < t <= node.parked_until:
            reports = self.serial
            self._step(node, t)
            assert self.serial == reports and node.clock >= t, "a parked node's steps reported"
        return node

    def _step(self, node: SimNode, horizon: float) -> None:
        node.prefetch(node.clock, instant=self.free)
        for request in node.admit():
            self._report(node.clock, ("end", request))
        if not node.requests:  # its requests wait for K,V on its way here (or none left)
            node.idle = all(node.held(r.session_id) for r in node.pending)
            return
        self._reports(node, node.run(horizon))

    def _reports(self, node: SimNode, out: Stretch) -> None:
        end = node.clock
        start = end - float(out.elapsed)
        for slot in np.flatnonzero(np.isfinite(out.first_token)):
            request = node.requests.get(int(node.slot_request[slot]))
            if request is not None:
                self._report(node.reported(start + float(out.first_token[slot])),
                             ("first", request))
        for request in node.finished(out):
            self._report(request.finish_s, ("end", request))
        load = len(node.requests) + len(node.pending)
        self.steps.append((end, node.index, load, node.device_bytes, node.host_bytes))

    def _launch(self, time_s: float, path: tuple[str, ...], nbytes: int, on_done) -> None:
        """Start a copy at ``time_s`` (a node's clock may be ahead of the events applied)."""
        self._report(time_s, ("copy", (path, nbytes, on_done)))

    def _report(self, time_s: float, what) -> None:
        """Queue a node's report. Most change no other node: a first token or an end changes
        the global scheduler's counts (which events read in time order), a copy's start the
        rates of its own node's flows (applied before that node steps again, as the report is
        no later than its clock). Those are notes, which do not stop other nodes' steps; the end
        of a request whose session has an arrival pending is not (it dispatches the next)."""
        kind, session = what[0], getattr(what[1], "session_id", None)
        note = kind != "wake" and (kind != "end" or not (self.queued[session]
                                                         or self.arrivals_due[session]))
        if note and kind == "end":
            self.ending[session] = time_s
        heapq.heappush(self.notes if note else self.events, (time_s, REPORT, self.serial, what))
        self.serial += 1

    def _push(self, events: Events) -> None:
        """Queue the schedule's arrivals and advisories (advisories are notes unless the
        system migrates on them)."""
        migrates = self.system.hints == "migrate"
        for t, kind, row, session in zip(events.time_s.tolist(), events.kind.tolist(),
                                         events.row.tolist(), events.session_id.tolist()):
            if kind == ARRIVAL:
                self.arrivals_due[session] += 1
                if self.ending.get(session, -math.inf) >= t:  # it will queue behind that end,
                    self._report(self.ending[session], ("wake", None))  # dispatched then
                heapq.heappush(self.events, (t, ARRIVING, self.serial, row))
            else:
                heapq.heappush(self.events if migrates else self.notes,
                               (t, ADVISORY, self.serial, session))
            self.serial += 1

    def _handle(self, t: float) -> None:
        """Apply the events at ``t`` (flows first, then reports, advisories, arrivals)."""
        idle = {n.index for n in self.nodes if n.idle or n.waiting_on}
        self.network.advance(t)
        while True:
            heads = [h for h in (self.events, self.notes) if h and h[0][0] <= t]
            if not heads:
                break
            _, kind, _, what = heapq.heappop(min(heads, key=lambda h: h[0]))
            if kind == REPORT:
                self._on_report(t, *what)
            elif kind == ADVISORY:
                self._on_advisory(t, what)
            else:
                self._on_arrival(t, what)
        for node in self.nodes:  # woken by what happened: its next step starts now
            if node.index in idle and not node.idle and not node.waiting_on:
                node.clock = max(node.clock, t)

    # ------------------------------------------------------------ events

    def _on_arrival(self, t: float, row: int) -> None:
        w = self.schedule.workload
        session = int(w.session_id[row])
        self.arrivals_due[session] -= 1
        history = self.history.get(session, 0)
        request = SimRequest(row, session, int(w.turn_index[row]),
                             history + int(w.input_tokens[row]), history,
                             int(w.output_tokens[row]), t,
                             self.scheduler.advisory_time(session, t))
        self.requests[row] = request
        if session in self.running:
            self.queued[session].append(request)
        else:
            self._dispatch(request, t)

    def _dispatch(self, request: SimRequest, t: float) -> None:
        session = request.session_id
        index = self.scheduler.place(session, t, session in self.migrating)
        if self.system.fetch_on_request or self.system.disk_tier:
            self._migrate(session, index, t)
        for m in self.unclaimed.pop(session, []):  # moved for it, before or now
            m.request_id = request.request_id
        request.node = index
        request.prefill_estimate = request.prompt_len - self.scheduler.kept_tokens(session,
                                                                                    index, t)
        node = self._at(index, t)
        if not node.busy:
            node.clock = max(node.clock, t)
        node.submit(request)
        self.running[session] = request
        self.scheduler.started(index, request.prefill_estimate)

    def _on_report(self, t: float, what: str, request) -> None:
        if what == "copy":
            path, nbytes, on_done = request
            self.network.start(path, nbytes, t, on_done)
            return
        if what == "wake":  # only stopped the nodes' steps here
            return
        if what == "first":
            request.first_token_s = t
            self.scheduler.first_token(request.node, request.prefill_estimate)
            return
        session = request.session_id
        self.ending.pop(session, None)
        decoding = not math.isnan(request.first_token_s)
        self.scheduler.ended(request.node, request.prefill_estimate, decoding)
        del self.running[session]
        self.ended += 1
        if not request.finish_reason.startswith("rejected"):
            self.history[session] = request.prompt_len + request.max_new_tokens
            self.scheduler.kept(session, request.node, self.history[session] - 1, t)
        else:
            request.finish_s = math.nan
        self._push(self.schedule.after_finish([request.request_id], [t]))
        if self.queued[session]:
            self._dispatch(self.queued[session].popleft(), t)

    def _on_advisory(self, t: float, session: int) -> None:
        self.scheduler.note_advisory(session, t)
        if self.system.hints == "migrate" and session not in self.running:
            self._migrate(session, self.scheduler.advise(session, t), t)

    def _migrate(self, session: int, dst: int, t: float) -> None:
        """Start moving ``session``'s K,V to node ``dst`` from the node holding it (its device
        or host tier, or its disk tier when that holds more); if ``dst`` holds it, bring up
        what its host tier alone holds (into free blocks) or what its disk tier holds. A system
        that does not migrate only reads its node's disk tier."""
        # Reading a parked node is reading it at ``t``: its steps change no idle session.
        src = self.scheduler.kv_node(session, t)
        if src < 0 or session in self.migrating or (src != dst and not self.system.migrates):
            return
        source = self.nodes[src]
        if source.held(session):
            return
        slot = source.idle_slot(session)
        tokens = source.session_tokens(slot) if slot is not None else 0
        if source.disk.get(session, 0) > tokens:
            self._move(session, src, dst, source.disk[session], t, from_disk=True)
        elif src != dst and tokens:
            self._move(session, src, dst, tokens, t)
        elif src == dst and self.system.migrates:
            slot = source.missing_slot(session)
            if slot is not None:
                target = self._at(dst, t)
                target.prefetch_slot(slot, max(t, target.clock))

    def _move(self, session: int, src: int, dst: int, tokens: int, t: float,
              from_disk: bool = False) -> None:
        """Copy ``tokens`` of ``session``'s K,V from node ``src`` (its disk tier, or its host
        tier and device) into ``dst``'s host tier, then into free blocks. Moves between nodes
        cross both network interfaces and are recorded as migrations."""
        target = self._at(dst, t)
        dst_slot = target.import_session(session, tokens)
        if dst_slot is None:
            return
        path = (f"nic{src}", f"nic{dst}") if src != dst else ()
        if from_disk:
            self.nodes[src].unsave(session)
            path = (f"disk{src}",) + path
        self.scheduler.where[session] = KVLocation(dst, tokens)
        nbytes = target.kv_bytes(tokens)
        migration = _Migration(session, src, dst, nbytes, t)
        self.migrating[session] = migration
        if src != dst:
            self.migrations.append(migration)
            self.unclaimed.setdefault(session, []).append(migration)
        generation = int(target.generation[dst_slot])

        def arrived(end: float) -> None:
            migration.end_s = end
            del self.migrating[session]
            target.imported(dst_slot, tokens, generation)
            if src != dst:
                self.nodes[src].drop_session(session)
            target.prefetch(end, instant=self.free)

        latency = self.config.migration_latency_s if src != dst and not self.free else 0.0
        self.network.start(path, 0 if self.free else nbytes, t, arrived, latency)

    def _stuck(self) -> str:
        waiting = {n.index: len(n.requests) + len(n.pending) for n in self.nodes if n.busy}
        return (f"simulate: {self.schedule.num_rows - self.ended} requests can never run "
                f"(requests per node: {waiting}); a request may need more K,V than a node holds")

    # ------------------------------------------------------------ records

    def records(self) -> ClusterRecords:
        rs = [self.requests[row] for row in sorted(self.requests)]
        done = [r.finish_reason == "length" for r in rs]
        so_far = {}  # unfinished requests: (generated, computed, recomputed)
        for node in self.nodes:
            so_far.update(node.progress())
        counts = [(r.max_new_tokens, r.prefill_tokens, r.recomputed_tokens) if ok else
                  so_far.get(r.request_id, (0, r.prefill_tokens, r.recomputed_tokens))
                  for r, ok in zip(rs, done)]
        requests = metrics.RequestRecords(
            request_id=[r.request_id for r in rs], session_id=[r.session_id for r in rs],
            turn_index=[r.turn_index for r in rs],
            node=[r.node if r.finish_reason is None or ok else -1 for r, ok in zip(rs, done)],
            arrival_s=[r.arrival_s for r in rs], advisory_s=[r.advisory_s for r in rs],
            first_token_s=[r.first_token_s for r in rs],
            finish_s=[r.finish_s if ok else math.nan for r, ok in zip(rs, done)],
            input_tokens=[r.prompt_len for r in rs],
            output_tokens=[c[0] for c in counts], prefill_tokens=[c[1] for c in counts],
            recomputed_tokens=[c[2] for c in counts])
        return ClusterRecords(requests, None, step_records(self.steps),
                              transfer_records(self.migrations))


def simulate(schedule: Schedule, system: str | System, config: SimConfig, cost, *,
             until_s: float = math.inf, progress: bool = False) -> ClusterRecords:
    """Serve ``schedule`` with ``system`` on a simulated cluster of ``config``, each step
    taking ``cost.step_time(query_lens, context_lens)`` seconds, until every request ended or
    ``until_s``; returns its records (request ids are the schedule's rows; requests that had
    not arrived by ``until_s`` are absent, those unfinished have no finish time)."""
    return Simulator(schedule, system, config, cost).run(until_s, progress)
