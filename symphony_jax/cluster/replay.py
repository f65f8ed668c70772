"""Replaying a workload's schedule on a cluster, in real time.

``run`` feeds a ``workloads.Schedule`` to a ``Cluster``: arrivals and advisories are released
when the cluster's clock reaches their times (seconds from the start of the run), every finished
request feeds the schedule's ``after_finish`` (closed loop: the chain's next request and its
advisories), and the cluster steps in between. A request's new tokens are the workload's token
ids if it has them, else ids drawn from the seed, the session and the turn; it generates exactly
its turn's output tokens (greedy, end-of-sequence ignored). A rejected request ends its turn
(the chain goes on).

Timing a replay: engines compile a step shape when they first meet it, seconds on a CPU. A
warm-up replay of the same schedule followed by ``Cluster.compile_steps`` compiles most of what
a timed replay meets; a cluster on a ``CompileFreeClock`` does not count what still compiles
(``timed_replays`` does both).
"""

from __future__ import annotations

import dataclasses
import heapq
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from symphony_jax.cluster.cluster import Cluster, ClusterConfig
from symphony_jax.cluster.records import ClusterRecords
from symphony_jax.cluster.systems import System
from symphony_jax.engine.sampling import SamplingParams
from symphony_jax.progress import bar as progress_bar
from symphony_jax.model.params import LlamaParams
from symphony_jax.workloads.schedule import ARRIVAL, Events, Schedule


class CompileFreeClock:
    """``time.monotonic`` less the time JAX has spent tracing, lowering and compiling while it
    was in use (a ``with`` block): a run timed as if every shape it met had been compiled
    before it started, as a serving engine compiles its shapes at start-up. The engine here
    compiles a shape when it first meets it; one warm-up run and ``Cluster.compile_steps``
    leave few such shapes, and this clock keeps those few from timing as multi-second
    stalls."""

    EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
              "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")

    def __init__(self):
        self.seconds, self.compiles = 0.0, 0  # excluded so far, and XLA compilations

    def __call__(self) -> float:
        return time.monotonic() - self.seconds

    def _record(self, event: str, seconds: float, **_) -> None:
        if event in self.EVENTS:
            self.seconds += seconds
            self.compiles += event == self.EVENTS[-1]

    def __enter__(self) -> CompileFreeClock:
        jax.monitoring.register_event_duration_secs_listener(self._record)
        return self

    def __exit__(self, *_) -> None:
        jax.monitoring.unregister_event_duration_listener(self._record)


def timed_replays(schedule: Schedule, cluster_on: Callable[[Callable[[], float]], Cluster], *,
                  repeats: int = 1, seed: int = 0,
                  ) -> tuple[list[tuple[ClusterRecords, Cluster]], tuple[int, float]]:
    """Replay ``schedule`` once untimed on ``cluster_on(time.monotonic)``, compile on every node
    the steps any node ran (``Cluster.compile_steps``), then ``repeats`` times on fresh
    clusters ``cluster_on(clock)`` with a ``CompileFreeClock``. Returns each timed replay's
    records and cluster, and the compilations (count, seconds) the clock left out."""
    warm_up = cluster_on(time.monotonic)
    replay(schedule, warm_up, seed=seed)
    warm_up.compile_steps()
    runs = []
    with CompileFreeClock() as clock:
        for _ in range(repeats):
            cluster = cluster_on(clock)
            runs.append((replay(schedule, cluster, seed=seed), cluster))
    return runs, (clock.compiles, clock.seconds)


def turn_tokens(schedule: Schedule, row: int, vocab_size: int, seed: int = 0) -> list[int]:
    """The new tokens of ``row``: the workload's ids if it has them (checked against the
    vocabulary), else drawn from ``seed``, the session and the turn."""
    w = schedule.workload
    ids = w.token_ids[row] if w.token_ids is not None else None
    if ids is not None:
        if any(not 0 <= t < vocab_size for t in ids):
            raise ValueError(f"workload.token_ids[{row}]: expected ids in [0, {vocab_size})")
        return list(ids)
    rng = np.random.default_rng([seed, int(w.session_id[row]), int(w.turn_index[row])])
    return rng.integers(0, vocab_size, int(w.input_tokens[row])).tolist()


def run(schedule: Schedule, system: str | System, config: ClusterConfig, params: LlamaParams,
        *, seed: int = 0, faults: Sequence[tuple[float, int]] = (), idle_sleep_s: float = 1e-3,
        progress: bool = False, **engine_kwargs) -> ClusterRecords:
    """Serve ``schedule`` with ``system`` on a cluster of ``config``; returns its records.
    Request ids are the schedule's rows. ``faults``: (time s, node) removals."""
    if not isinstance(schedule, Schedule):
        raise ValueError(f"run: schedule={schedule!r}: expected a workloads Schedule")
    return replay(schedule, Cluster(config, system, params, **engine_kwargs), seed=seed,
                  faults=faults, idle_sleep_s=idle_sleep_s, progress=progress)


def replay(schedule: Schedule, cluster: Cluster, *, seed: int = 0,
           faults: Sequence[tuple[float, int]] = (), idle_sleep_s: float = 1e-3,
           progress: bool = False) -> ClusterRecords:
    """``run`` on a cluster already built (a caller that reads its nodes afterwards)."""
    vocab = cluster.config.engine.model.vocab_size
    w = schedule.workload
    queue: list[tuple[float, int, int, int]] = []  # (time, kind, order, row or session)
    serial = 0

    def push(events: Events) -> None:
        nonlocal serial
        for t, kind, row, session in zip(events.time_s, events.kind, events.row,
                                         events.session_id):
            heapq.heappush(queue, (float(t), int(kind), serial,
                                   int(row) if kind == ARRIVAL else int(session)))
            serial += 1

    push(schedule.initial_events())
    faults = sorted((float(t), int(node)) for t, node in faults)
    row_of: dict[int, int] = {}  # cluster request id -> row
    ended = 0
    bar = progress_bar(schedule.num_rows, progress)
    while ended < schedule.num_rows:
        now = cluster.now()
        while faults and faults[0][0] <= now:
            cluster.remove_node(faults.pop(0)[1])
        while queue and queue[0][0] <= now:
            _, kind, _, key = heapq.heappop(queue)
            if kind == ARRIVAL:
                sampling = SamplingParams(max_tokens=int(w.output_tokens[key]), ignore_eos=True)
                request = cluster.submit(int(w.session_id[key]),
                                         turn_tokens(schedule, key, vocab, seed), sampling)
                row_of[request] = key
            else:
                cluster.advise(key)
        if not cluster.has_unfinished():
            if queue:
                time.sleep(min(idle_sleep_s, max(queue[0][0] - cluster.now(), 0.0)))
            continue
        finished = cluster.step()
        if finished:
            rows = [row_of[r] for r in finished]
            push(schedule.after_finish(rows, [cluster.requests[r].finish_s for r in finished]))
            ended += len(finished)
            bar.update(len(finished))
    bar.close()
    return _by_row(cluster.records(), row_of)


def _by_row(records: ClusterRecords, row_of: dict[int, int]) -> ClusterRecords:
    """Request and token ids renamed to schedule rows."""
    rename = np.vectorize(lambda i: row_of.get(int(i), -1), otypes=[np.int64])
    r, t, m = records.requests, records.tokens, records.transfers
    return dataclasses.replace(
        records,
        requests=type(r)(**{**r.columns(), "request_id": rename(r.request_id)}),
        tokens=type(t)(**{**t.columns(), "request_id": rename(t.request_id)}),
        transfers=type(m)(**{**m.columns(), "request_id": np.where(
            m.request_id >= 0, rename(m.request_id), -1)}))
