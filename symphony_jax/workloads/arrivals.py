"""Chat arrival processes: closed loop (N concurrent users) and open loop (trace timestamps).

**Closed loop** (SYMPHONY's load axis is the number of concurrent users). User
``u`` of ``N`` replays the sessions at positions ``u, u + N, u + 2N, ...`` (in ``session_id``
order) back to back. After each response the user thinks (``ThinkTime``: reads the answer,
idles for the extra gap, types the next prompt), then sends the next turn, which may be the
first turn of the user's next session. Users start at independent uniform times in
``[0, stagger_s)`` and type their first prompt. Assigning sessions to users statically keeps
the schedule a pure function of the workload and the seed; the executor supplies finish times.

**Open loop**: each turn arrives at its recorded time (``Workload.arrival_s``) multiplied by
``time_scale`` (< 1 compresses the trace, i.e. raises the load), whatever the service does.

Advisories: each turn's advisory is sent when the user starts typing, ``lead_scale`` times the
typing time before the request, but never before the previous answer is complete (closed loop)
or before the session's previous request arrived (open loop, where completion is unknown).
False extras come while the user reads an answer (see ``advisory``). Random draws are keyed by
session and turn, and stagger by user, so a session's think times and hints do not change
with the number of users or the other sessions.
"""

from __future__ import annotations

import numpy as np

from symphony_jax.workloads import _random
from symphony_jax.workloads._checks import check_number, fail, positions_in_groups
from symphony_jax.workloads.advisory import (AdvisoryConfig, Advisories, apply_config,
                                             false_advisories, lead_before)
from symphony_jax.workloads.schedule import Schedule
from symphony_jax.workloads.session import Workload
from symphony_jax.workloads.think_time import ThinkTime

_EXTRA_GAP, _STAGGER = 1, 2  # streams of keyed draws


def closed_loop(workload: Workload, num_users: int, *, think: ThinkTime = ThinkTime(),
                advisories: AdvisoryConfig = AdvisoryConfig(), stagger_s: float = 60.0,
                seed: int = 0) -> Schedule:
    """``num_users`` users replay ``workload`` back to back, thinking between turns."""
    if isinstance(num_users, bool) or not isinstance(num_users, (int, np.integer)) or \
            num_users < 1:
        fail("closed_loop", "num_users", num_users, "an integer >= 1")
    check_number("closed_loop", "stagger_s", stagger_s, 0.0)
    w = workload
    rows = np.arange(w.num_turns, dtype=np.int64)
    chain = np.repeat(np.arange(w.num_sessions, dtype=np.int64) % num_users, w.turns_per_session)
    # Row order is each user's order (sessions ascending, turns in order): rank rows per user.
    order = np.argsort(chain, kind="stable")
    per_user = np.bincount(chain, minlength=num_users)
    step = np.empty_like(rows)
    step[order] = positions_in_groups(per_user)
    prev = np.full_like(rows, -1)
    same_user = chain[order][1:] == chain[order][:-1]
    prev[order[1:][same_user]] = order[:-1][same_user]
    head = prev < 0

    typing = think.typing_s(w.input_tokens)
    reading = np.where(head, 0.0, think.reading_s(w.output_tokens[np.maximum(prev, 0)]))
    extra = np.where(head, 0.0, think.extra.sample(seed, _EXTRA_GAP, w.session_id, w.turn_index))
    start = _random.uniform(seed, _STAGGER, chain) * stagger_s
    gap = np.where(head, start, reading + extra) + typing
    return _with_advisories(w, chain, step, gap, prev, advisories.lead_scale * typing,
                            think.reading_s(w.output_tokens), advisories, seed, None)


def open_loop(workload: Workload, *, think: ThinkTime = ThinkTime(),
              advisories: AdvisoryConfig = AdvisoryConfig(), time_scale: float = 1.0,
              seed: int = 0) -> Schedule:
    """Every turn arrives at ``time_scale * workload.arrival_s``, whatever the service does."""
    if workload.arrival_s is None:
        fail("open_loop", "workload.arrival_s", None, "arrival times (a trace-derived workload)")
    check_number("open_loop", "time_scale", time_scale, 0.0, low_open=True)
    w = workload
    arrival = w.arrival_s * time_scale
    previous_turn = np.where(w.turn_index > 0, np.roll(arrival, 1), 0.0)
    lead = np.minimum(advisories.lead_scale * think.typing_s(w.input_tokens),
                      arrival - previous_turn)
    rows = np.arange(w.num_turns, dtype=np.int64)
    return _with_advisories(w, rows, np.zeros_like(rows), arrival, np.full_like(rows, -1), lead,
                            think.reading_s(w.output_tokens), advisories, seed, arrival)


def _with_advisories(w: Workload, chain: np.ndarray, step: np.ndarray, gap: np.ndarray,
                     prev: np.ndarray, lead: np.ndarray, reading: np.ndarray,
                     config: AdvisoryConfig, seed: int,
                     arrival: np.ndarray | None) -> Schedule:
    """The schedule with one advisory per turn, ``lead`` before it, plus false extras."""
    rows = np.arange(w.num_turns, dtype=np.int64)
    trigger, offset = lead_before(rows, lead, prev, gap)
    intended = Advisories(trigger, offset, w.session_id, w.turn_index, rows,
                          np.zeros(len(rows), bool))
    sent = apply_config(intended, (w.session_id, w.turn_index), config, seed, prev, gap)
    extras = false_advisories(w.session_id, w.turn_index, reading, 1.0, config, seed, arrival)
    return Schedule(w, chain, step, gap, Advisories.concat(sent, extras))
