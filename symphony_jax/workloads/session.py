"""Multi-turn sessions: what a workload asks of the serving system.

A workload is a set of sessions; a session is an ordered list of turns. Turn ``k`` adds
``input_tokens[k]`` new tokens (the user's message, or an agent's new input) and the model
answers with ``output_tokens[k]`` tokens. Every turn depends on the session's full history, so
its prompt is all earlier inputs and outputs followed by its new input::

    history_tokens[k] = sum(input_tokens[j] + output_tokens[j] for j < k)
    prompt_tokens[k]  = history_tokens[k] + input_tokens[k]

A stateless engine prefills ``prompt_tokens[k]`` (recomputing the history); an engine that
kept the session's K,V prefills ``input_tokens[k]`` only.

Two views of the same data:

- ``Turn`` and ``Session``: small frozen objects for hand-written workloads and for reading one
  session at a time.
- ``Workload``: the columnar contract, one row per turn, rows grouped by session (ascending
  ``session_id``) and in turn order within a session. Generators and loaders build it directly
  with numpy; simulators address turns by row number.

Optional per-turn arrival times (``arrival_s``, seconds from the workload's start) make a
workload replayable open-loop; ``symphony_jax.workloads.arrivals`` turns a workload into a
schedule of arrivals and advisories, open- or closed-loop.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Iterator

import numpy as np

from symphony_jax.workloads._checks import (column, cumsum_in_groups, fail, positions_in_groups,
                                            run_lengths)


@dataclasses.dataclass(frozen=True)
class Turn:
    """One request of a session: the tokens it adds and the tokens generated in answer."""

    input_tokens: int  # new tokens this turn adds to the session (>= 1)
    output_tokens: int  # tokens the model generates (>= 1)
    token_ids: tuple[int, ...] | None = None  # ids of the new input tokens, if known
    text: str | None = None  # text of the new input, if known

    def __post_init__(self):
        for field in ("input_tokens", "output_tokens"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                fail("Turn", field, value, "an integer >= 1")
        if self.token_ids is not None:
            ids = tuple(int(i) for i in self.token_ids)
            if len(ids) != self.input_tokens or any(i < 0 for i in ids):
                fail("Turn", "token_ids", f"<{len(ids)} ids>",
                     f"{self.input_tokens} non-negative ids (one per input token)")
            object.__setattr__(self, "token_ids", ids)
        if self.text is not None and not isinstance(self.text, str):
            fail("Turn", "text", self.text, "a string or None")


@dataclasses.dataclass(frozen=True)
class Session:
    """An ordered list of turns; each depends on all the turns before it."""

    session_id: int
    turns: tuple[Turn, ...]
    arrival_s: tuple[float, ...] | None = None  # open-loop arrival of each turn (s)

    def __post_init__(self):
        object.__setattr__(self, "turns", tuple(self.turns))
        if not self.turns or not all(isinstance(t, Turn) for t in self.turns):
            fail("Session", "turns", self.turns, "a non-empty sequence of Turn")
        if self.arrival_s is not None:
            times = tuple(float(t) for t in self.arrival_s)
            if len(times) != len(self.turns) or not all(np.isfinite(times)) or \
                    any(b < a for a, b in zip(times, times[1:])) or min(times) < 0:
                fail("Session", "arrival_s", self.arrival_s,
                     f"{len(self.turns)} finite non-negative, non-decreasing times")
            object.__setattr__(self, "arrival_s", times)


@dataclasses.dataclass(frozen=True, eq=False)
class Workload:
    """Turns of all sessions as columns (T turns; rows grouped by session, in turn order).

    Construction validates every column and makes it a read-only array. Everything else
    (turn index, history, session boundaries) is derived from these columns.
    """

    session_id: np.ndarray  # i64[T]  session of each turn, non-decreasing
    input_tokens: np.ndarray  # i64[T]  new tokens each turn adds (>= 1)
    output_tokens: np.ndarray  # i64[T]  tokens generated in answer (>= 1)
    arrival_s: np.ndarray | None = None  # f64[T]  open-loop arrival (s, >= 0); None: none given
    token_ids: tuple[tuple[int, ...] | None, ...] | None = None  # [T] ids of each new input
    text: tuple[str | None, ...] | None = None  # [T] text of each new input

    def __post_init__(self):
        owner = "Workload"
        sessions = column(owner, "session_id", self.session_id, np.int64)
        n = len(sessions)
        object.__setattr__(self, "session_id", sessions)
        for field in ("input_tokens", "output_tokens"):
            object.__setattr__(self, field, column(owner, field, getattr(self, field), np.int64,
                                                   n, minimum=1))
        if n and np.any(np.diff(sessions) < 0):
            bad = int(np.flatnonzero(np.diff(sessions) < 0)[0]) + 1
            fail(owner, f"session_id[{bad}]", int(sessions[bad]),
                 "rows grouped by session in ascending session_id (a session's turns in order)")
        if self.arrival_s is not None:
            arrival = column(owner, "arrival_s", self.arrival_s, np.float64, n, minimum=0.0)
            backwards = (np.diff(arrival) < 0) & (np.diff(sessions) == 0)
            if backwards.any():
                bad = int(np.flatnonzero(backwards)[0]) + 1
                fail(owner, f"arrival_s[{bad}]", float(arrival[bad]),
                     f">= the previous turn's arrival {float(arrival[bad - 1])} (same session)")
            if not np.all(np.isfinite(arrival)):
                bad = int(np.flatnonzero(~np.isfinite(arrival))[0])
                fail(owner, f"arrival_s[{bad}]", float(arrival[bad]), "a finite time")
            object.__setattr__(self, "arrival_s", arrival)
        for field in ("token_ids", "text"):
            values = getattr(self, field)
            if values is not None:
                values = tuple(values)
                if len(values) != n:
                    fail(owner, field, f"<{len(values)} items>", f"{n} items (one per turn)")
                object.__setattr__(self, field, values)

    def __len__(self) -> int:
        return len(self.session_id)

    @property
    def num_turns(self) -> int:
        return len(self.session_id)

    @functools.cached_property
    def session_starts(self) -> np.ndarray:
        """i64[S + 1]: the turns of the s-th session are rows ``starts[s]:starts[s + 1]``."""
        return np.concatenate([[0], np.cumsum(run_lengths(self.session_id))]).astype(np.int64)

    @property
    def num_sessions(self) -> int:
        return len(self.session_starts) - 1

    @functools.cached_property
    def session_ids(self) -> np.ndarray:
        """i64[S]: the distinct session ids, ascending."""
        return self.session_id[self.session_starts[:-1]]

    @functools.cached_property
    def turns_per_session(self) -> np.ndarray:
        """i64[S]: number of turns of each session."""
        return np.diff(self.session_starts)

    @functools.cached_property
    def turn_index(self) -> np.ndarray:
        """i64[T]: 0-based position of each turn in its session."""
        return positions_in_groups(self.turns_per_session)

    @functools.cached_property
    def history_tokens(self) -> np.ndarray:
        """i64[T]: tokens of all earlier turns of the session (inputs and outputs)."""
        return cumsum_in_groups(self.input_tokens + self.output_tokens, self.turns_per_session,
                                exclusive=True)

    @property
    def prompt_tokens(self) -> np.ndarray:
        """i64[T]: the full prompt of each turn: history followed by the new input."""
        return self.history_tokens + self.input_tokens

    def session(self, position: int) -> Session:
        """The ``position``-th session (0-based, in ``session_id`` order) as a ``Session``."""
        if not 0 <= position < self.num_sessions:
            fail("Workload", "session", position, f"a position in [0, {self.num_sessions})")
        rows = range(self.session_starts[position], self.session_starts[position + 1])
        turns = tuple(Turn(int(self.input_tokens[r]), int(self.output_tokens[r]),
                           self.token_ids[r] if self.token_ids else None,
                           self.text[r] if self.text else None) for r in rows)
        arrival = None if self.arrival_s is None else tuple(self.arrival_s[rows.start:rows.stop])
        return Session(int(self.session_id[rows.start]), turns, arrival)

    def sessions(self) -> Iterator[Session]:
        """Every session, in ``session_id`` order."""
        return (self.session(i) for i in range(self.num_sessions))

    @classmethod
    def from_sessions(cls, sessions: Iterable[Session]) -> Workload:
        """The columnar form of ``sessions`` (sorted by id; ids must be distinct)."""
        ordered = sorted(sessions, key=lambda s: s.session_id)
        ids = [s.session_id for s in ordered]
        if len(set(ids)) != len(ids):
            fail("Workload", "from_sessions", ids, "distinct session ids")
        turns = [t for s in ordered for t in s.turns]
        timed = [s.arrival_s is not None for s in ordered]
        if any(timed) and not all(timed):
            fail("Workload", "from_sessions", "<mixed>",
                 "arrival times for every session or for none")
        optional = lambda name: tuple(getattr(t, name) for t in turns) \
            if any(getattr(t, name) is not None for t in turns) else None
        return cls(
            session_id=np.repeat(np.asarray(ids, np.int64), [len(s.turns) for s in ordered]),
            input_tokens=np.asarray([t.input_tokens for t in turns], np.int64),
            output_tokens=np.asarray([t.output_tokens for t in turns], np.int64),
            arrival_s=np.asarray([a for s in ordered for a in s.arrival_s], np.float64)
            if all(timed) and ordered else None,
            token_ids=optional("token_ids"), text=optional("text"))

    def select_sessions(self, keep: np.ndarray) -> Workload:
        """The workload restricted to the sessions where ``keep`` (bool[S]) is true."""
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != (self.num_sessions,):
            fail("Workload", "select_sessions", f"<shape {keep.shape}>",
                 f"a bool array of shape ({self.num_sessions},)")
        rows = np.repeat(keep, self.turns_per_session)
        return self.select_rows(rows)

    def select_rows(self, rows: np.ndarray) -> Workload:
        """The workload restricted to the turns where ``rows`` (bool[T]) is true.

        Dropping a turn does not renumber the rest: the caller keeps whole sessions or a prefix
        of each session (a kept turn whose predecessor was dropped would lose its history).
        """
        rows = np.asarray(rows, dtype=bool)
        pick = lambda values: None if values is None else tuple(
            v for v, k in zip(values, rows) if k)
        return Workload(self.session_id[rows], self.input_tokens[rows], self.output_tokens[rows],
                        None if self.arrival_s is None else self.arrival_s[rows],
                        pick(self.token_ids), pick(self.text))
