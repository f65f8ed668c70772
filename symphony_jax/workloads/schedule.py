"""When requests and advisories happen: the schedule an executor replays.

A ``Schedule`` is a workload plus timing. Every turn (row) belongs to a *chain*: the sequence
of requests one client issues, each after the previous one finished (a chat user going through
sessions, an agent job going through its steps). A chain's first row (its head) arrives at the
absolute time ``gap_s``; every later row arrives ``gap_s`` seconds after the previous row of
its chain *finishes*. Open-loop schedules make every row a head (arrivals fixed in advance);
closed-loop schedules chain rows, so arrivals depend on service times that only the executor
knows. Advisories are timed the same way (see ``advisory``).

Executors use three calls, all vectorised and free of side effects:

- ``initial_events()``: what happens at fixed times (chain heads, absolute advisories);
- ``after_finish(rows, finish_s)``: what the given rows' completion causes (next arrivals of
  their chains, advisories triggered by them), with absolute times; a simulator batches the
  rows that finish in one step;
- ``replay(service_s)``: every event, given each row's service time (arrival to finish); for
  open loop, ``replay()`` is the whole time-ordered stream.

Events come as columns sorted by time; at equal times advisories sort before arrivals, then by
row. An executor that feeds its real finish times into ``after_finish`` sees exactly the
arrivals that ``replay`` computes from the same service times.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from symphony_jax.workloads._checks import (column, cumsum_in_groups, fail, positions_in_groups,
                                            run_lengths)
from symphony_jax.workloads.advisory import Advisories
from symphony_jax.workloads.session import Workload

ADVISORY, ARRIVAL = 0, 1  # event kinds; at equal times an advisory sorts first


@dataclasses.dataclass(frozen=True, eq=False)
class Events:
    """Time-ordered arrivals and advisories (E events)."""

    time_s: np.ndarray  # f64[E]  when it happens (s from the workload's start)
    kind: np.ndarray  # i8[E]   ADVISORY or ARRIVAL
    row: np.ndarray  # i64[E]  the arriving row; for an advisory its target row (-1: false)
    session_id: np.ndarray  # i64[E]  session of the request or announced by the advisory
    turn_index: np.ndarray  # i64[E]  turn of the request or announced by the advisory
    late: np.ndarray  # bool[E] advisory sent late (always False for arrivals)

    @property
    def is_false(self) -> np.ndarray:
        """bool[E]: advisories after which no such request follows."""
        return (self.kind == ADVISORY) & (self.row < 0)

    def __len__(self) -> int:
        return len(self.time_s)

    @staticmethod
    def in_time_order(time_s, kind, row, session_id, turn_index, late) -> Events:
        order = np.lexsort((row, kind, time_s))
        return Events(np.asarray(time_s, np.float64)[order], np.asarray(kind, np.int8)[order],
                      np.asarray(row, np.int64)[order], np.asarray(session_id, np.int64)[order],
                      np.asarray(turn_index, np.int64)[order], np.asarray(late, bool)[order])


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    """A workload's turns placed on chains, with their advisories (T rows, A advisories)."""

    workload: Workload
    chain: np.ndarray  # i64[T]  client issuing the row (user, agent job; open loop: the row)
    chain_step: np.ndarray  # i64[T]  position of the row in its chain, 0-based, consecutive
    gap_s: np.ndarray  # f64[T]  head: arrival time (s); else delay after the previous finishes
    advisories: Advisories

    def __post_init__(self):
        owner = "Schedule"
        if not isinstance(self.workload, Workload):
            fail(owner, "workload", self.workload, "a Workload")
        n = self.workload.num_turns
        object.__setattr__(self, "chain", column(owner, "chain", self.chain, np.int64, n))
        object.__setattr__(self, "chain_step", column(owner, "chain_step", self.chain_step,
                                                      np.int64, n, minimum=0))
        gap = column(owner, "gap_s", self.gap_s, np.float64, n, minimum=0.0)
        if not np.all(np.isfinite(gap)):
            fail(owner, "gap_s", "<non-finite>", "finite gaps")
        object.__setattr__(self, "gap_s", gap)
        order = self._chain_order
        expected = positions_in_groups(run_lengths(self.chain[order]))
        if np.any(self.chain_step[order] != expected):
            bad = int(order[np.flatnonzero(self.chain_step[order] != expected)[0]])
            fail(owner, f"chain_step[{bad}]", int(self.chain_step[bad]),
                 "0, 1, 2, ... along every chain")
        self._check_sessions_follow_chains()
        adv = self.advisories
        if len(adv) and (adv.trigger_row.max() >= n or adv.target_row.max() >= n):
            fail(owner, "advisories", "<rows>", f"trigger and target rows in [-1, {n})")
        real = adv.target_row[adv.target_row >= 0]
        if np.any(self.workload.session_id[real] != adv.session_id[adv.target_row >= 0]) or \
                np.any(self.workload.turn_index[real] != adv.turn_index[adv.target_row >= 0]):
            fail(owner, "advisories", "<targets>", "the session and turn of each target row")

    def _check_sessions_follow_chains(self) -> None:
        """A turn must come after its session's previous turn, on the same chain."""
        w = self.workload
        follows = np.flatnonzero(w.turn_index > 0)
        if self.closed_loop:
            ok = (self.chain[follows] == self.chain[follows - 1]) & \
                 (self.chain_step[follows] > self.chain_step[follows - 1])
        else:
            ok = self.gap_s[follows] >= self.gap_s[follows - 1]
        if not ok.all():
            bad = int(follows[~ok][0])
            fail("Schedule", f"row {bad}", f"session {w.session_id[bad]} turn "
                 f"{w.turn_index[bad]}", "to come after the session's previous turn")

    @property
    def num_rows(self) -> int:
        return len(self.chain)

    @functools.cached_property
    def closed_loop(self) -> bool:
        """True if some row or advisory waits for a row's finish."""
        return bool(np.any(self.chain_step > 0) or np.any(self.advisories.trigger_row >= 0))

    @functools.cached_property
    def _chain_order(self) -> np.ndarray:
        """i64[T]: rows sorted by chain, then step."""
        return np.lexsort((self.chain_step, self.chain))

    @functools.cached_property
    def next_row(self) -> np.ndarray:
        """i64[T]: the row its chain issues after this one finishes; -1 if none."""
        order, nxt = self._chain_order, np.full(self.num_rows, -1, np.int64)
        same = self.chain[order][1:] == self.chain[order][:-1]
        nxt[order[:-1][same]] = order[1:][same]
        return nxt

    @functools.cached_property
    def prev_row(self) -> np.ndarray:
        """i64[T]: the row after whose finish this one arrives; -1 for chain heads."""
        prev = np.full(self.num_rows, -1, np.int64)
        has_next = self.next_row >= 0
        prev[self.next_row[has_next]] = np.flatnonzero(has_next)
        return prev

    @functools.cached_property
    def _by_trigger(self) -> tuple[np.ndarray, np.ndarray]:
        """Advisory indices sorted by trigger row, and CSR offsets per row (trigger -1 first)."""
        order = np.argsort(self.advisories.trigger_row, kind="stable")
        starts = np.searchsorted(self.advisories.trigger_row[order],
                                 np.arange(-1, self.num_rows + 1))
        return order, starts

    def initial_events(self) -> Events:
        """Events at fixed times: chain heads' arrivals and advisories with trigger -1."""
        heads = np.flatnonzero(self.prev_row < 0)
        order, starts = self._by_trigger
        absolute = order[starts[0]:starts[1]]
        return self._events(heads, self.gap_s[heads], absolute, self.advisories.offset_s[absolute])

    def after_finish(self, rows, finish_s) -> Events:
        """Events caused by ``rows`` (i64[B]) finishing at ``finish_s`` (f64[B], s).

        The next row of each finished row's chain arrives ``gap_s`` later; advisories triggered
        by a finished row come ``offset_s`` after its finish. Rows are distinct finished rows.
        """
        rows = np.atleast_1d(np.asarray(rows, np.int64))
        finish = np.broadcast_to(np.asarray(finish_s, np.float64), rows.shape)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            fail("Schedule", "after_finish.rows", rows, f"rows in [0, {self.num_rows})")
        nxt = self.next_row[rows]
        arriving = nxt >= 0
        order, starts = self._by_trigger
        lo, hi = starts[rows + 1], starts[rows + 2]
        counts = hi - lo
        advisory = order[np.repeat(lo, counts) + positions_in_groups(counts)]
        return self._events(nxt[arriving], finish[arriving] + self.gap_s[nxt[arriving]], advisory,
                            np.repeat(finish, counts) + self.advisories.offset_s[advisory])

    def replay(self, service_s=None) -> tuple[Events, np.ndarray]:
        """Every event, given each row's service time; also each row's arrival time (f64[T]).

        ``service_s`` (f64[T], s from arrival to finish) is required for closed loop; nothing in
        an open-loop schedule depends on it.
        """
        n = self.num_rows
        if service_s is None:
            if self.closed_loop:
                fail("Schedule", "replay.service_s", None, "service times (closed loop)")
            service = np.zeros(n)
        else:
            service = column("Schedule", "replay.service_s", service_s, np.float64, n, 0.0)
        order = self._chain_order
        head = self.prev_row[order] < 0
        # arrival = chain's head time + sum over earlier chain rows of (service + next gap)
        step = self.gap_s[order] + np.where(head, 0.0, service[self.prev_row[order]])
        arrival = np.empty(n)
        arrival[order] = cumsum_in_groups(step, run_lengths(self.chain[order]))
        adv = self.advisories
        triggered = adv.trigger_row >= 0
        finish = arrival + service
        times = np.where(triggered, finish[np.maximum(adv.trigger_row, 0)], 0.0) + adv.offset_s
        return self._events(np.arange(n), arrival, np.arange(len(adv)), times), arrival

    def _events(self, rows: np.ndarray, arrival_s: np.ndarray, advisories: np.ndarray,
                advisory_s: np.ndarray) -> Events:
        w, adv = self.workload, self.advisories
        return Events.in_time_order(
            np.concatenate([advisory_s, arrival_s]),
            np.concatenate([np.full(len(advisories), ADVISORY), np.full(len(rows), ARRIVAL)]),
            np.concatenate([adv.target_row[advisories], rows]),
            np.concatenate([adv.session_id[advisories], w.session_id[rows]]),
            np.concatenate([adv.turn_index[advisories], w.turn_index[rows]]),
            np.concatenate([adv.late[advisories], np.zeros(len(rows), bool)]))

