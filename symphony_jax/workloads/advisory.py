"""Advisory requests: hints that a session's next request is coming, and how they go wrong.

An advisory names a session and the turn it announces. It carries no arrival time and no size
(SYMPHONY, arXiv 2412.16434, NSDI'26 §3.2); a serving system may use it to move the session's
K,V cache to the node that will serve the turn before the request arrives.

Timing is relative, because in a closed loop it depends on when earlier requests finish, which
only the executor knows. Each advisory has a *trigger*: ``trigger_row = r`` means "``offset_s``
seconds after row ``r`` finishes"; ``trigger_row = -1`` means ``offset_s`` is an absolute time
(seconds from the workload's start). ``target_row`` is the row it announces, or -1 for a false
advisory, after which no such request follows.

The knobs of ``AdvisoryConfig`` model the ways hints go wrong (SYMPHONY evaluates drops in
Fig. 19, false hints in Fig. 20, and assumes hints come early enough, §3.6):

- ``drop_fraction``: each advisory is independently not sent.
- ``late_fraction``: each sent advisory that announces a real request is independently late:
  it comes ``late_lead_s`` before its request (0: with it; negative: after it) instead of at its
  normal time.
- ``false_fraction``: extra false advisories are added so that, in expectation, this fraction
  of all sent advisories are false. An extra false advisory is anchored on a turn: it comes at
  a uniform random point of a window after that turn ends (the builder chooses the window; for
  chat, the time to read the answer) and announces the session's next turn, which either never
  comes or comes later with its own advisory.
- ``lead_scale`` multiplies the lead of every advisory whose lead is modelled (chat typing
  time); builders apply it.

All decisions are keyed random draws (``_random``): the fate of one advisory depends on the
seed and on the turn it concerns, not on the rest of the workload.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from symphony_jax.workloads import _random
from symphony_jax.workloads._checks import check_number, column, fail, positions_in_groups

# Streams of keyed draws, one per decision.
_DROP, _LATE, _FALSE_COUNT, _FALSE_AT = 11, 12, 13, 14


@dataclasses.dataclass(frozen=True)
class AdvisoryConfig:
    """How advisories deviate from the ideal (every hint sent, on time, and true)."""

    drop_fraction: float = 0.0  # P(an advisory is not sent), in [0, 1]
    false_fraction: float = 0.0  # expected share of false ones among sent advisories, [0, 1)
    lead_scale: float = 1.0  # multiplies modelled leads, >= 0
    late_fraction: float = 0.0  # P(a sent true advisory is late), in [0, 1]
    late_lead_s: float = 0.0  # lead of a late advisory (s); negative: after its request

    def __post_init__(self):
        owner = "AdvisoryConfig"
        check_number(owner, "drop_fraction", self.drop_fraction, 0.0, 1.0)
        check_number(owner, "false_fraction", self.false_fraction, 0.0, 0.99)
        check_number(owner, "lead_scale", self.lead_scale, 0.0)
        check_number(owner, "late_fraction", self.late_fraction, 0.0, 1.0)
        check_number(owner, "late_lead_s", self.late_lead_s, -np.inf, np.inf,
                     low_open=True, high_open=True)


@dataclasses.dataclass(frozen=True, eq=False)
class Advisories:
    """A table of advisories (A rows), each timed relative to a trigger."""

    trigger_row: np.ndarray  # i64[A]  row whose finish starts the clock; -1: absolute time
    offset_s: np.ndarray  # f64[A]  seconds after the trigger (absolute time if trigger is -1)
    session_id: np.ndarray  # i64[A]  session announced
    turn_index: np.ndarray  # i64[A]  turn announced (0-based; may not exist if false)
    target_row: np.ndarray  # i64[A]  row announced; -1: false advisory
    late: np.ndarray  # bool[A]  sent late (see AdvisoryConfig.late_fraction)

    def __post_init__(self):
        owner = "Advisories"
        n = len(np.asarray(self.trigger_row))
        for field, dtype, minimum in (("trigger_row", np.int64, -1), ("offset_s", np.float64, 0.0),
                                      ("session_id", np.int64, None),
                                      ("turn_index", np.int64, 0), ("target_row", np.int64, -1),
                                      ("late", np.bool_, None)):
            object.__setattr__(self, field, column(owner, field, getattr(self, field), dtype, n,
                                                   minimum))
        if not np.all(np.isfinite(self.offset_s)):
            fail(owner, "offset_s", "<non-finite>", "finite offsets")

    def __len__(self) -> int:
        return len(self.trigger_row)

    def take(self, index: np.ndarray) -> Advisories:
        """The advisories at ``index`` (an index or mask array), in that order."""
        return Advisories(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))

    @staticmethod
    def concat(*parts: Advisories) -> Advisories:
        return Advisories(*(np.concatenate([getattr(p, f.name) for p in parts])
                            for f in dataclasses.fields(Advisories)))


def lead_before(target_row: np.ndarray, lead_s: np.ndarray, prev_row: np.ndarray,
                gap_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Trigger and offset of advisories ``lead_s`` before their targets arrive.

    A target arrives ``gap_s`` after its predecessor in the schedule finishes (or at absolute
    time ``gap_s`` if it has none, ``prev_row = -1``). The advisory is never earlier than that
    predecessor's finish (or time 0): a hint cannot precede the answer the user reads.
    """
    return prev_row[target_row], np.maximum(gap_s[target_row] - lead_s, 0.0)


def apply_config(intended: Advisories, keys: tuple[np.ndarray, ...], config: AdvisoryConfig,
                 seed: int, prev_row: np.ndarray, gap_s: np.ndarray) -> Advisories:
    """Drop and delay the intended advisories as ``config`` says.

    ``keys`` are i64[A] arrays that together identify each advisory (its random draws).

    False extras are added separately (``false_advisories``).
    """
    sent = _random.uniform(seed, _DROP, *keys) >= config.drop_fraction
    late = (intended.target_row >= 0) & (_random.uniform(seed, _LATE, *keys) <
                                         config.late_fraction)
    trigger, offset = intended.trigger_row.copy(), intended.offset_s.copy()
    if late.any():
        target = intended.target_row[late]
        trigger[late], offset[late] = lead_before(target, np.float64(config.late_lead_s),
                                                  prev_row, gap_s)
    delayed = dataclasses.replace(intended, trigger_row=trigger, offset_s=offset, late=late)
    return delayed.take(sent)


def false_advisories(session_id: np.ndarray, turn_index: np.ndarray, window_s: np.ndarray,
                     per_row: float, config: AdvisoryConfig, seed: int,
                     anchor_arrival_s: np.ndarray | None) -> Advisories:
    """Extra false advisories anchored on turns (T rows).

    ``per_row`` is the number of true advisories the schedule intends per row; the count per
    row is Poisson with mean ``false_fraction / (1 - false_fraction) * (1 - drop_fraction) *
    per_row``, so that false ones are ``false_fraction`` of all sent advisories in expectation.
    Each comes at a uniform point of ``window_s`` after its anchor turn ends: after it finishes
    (closed loop, ``anchor_arrival_s`` None) or after it arrives (open loop: the finish time is
    unknown, so the offset counts from the anchor's ``anchor_arrival_s``).
    """
    f = config.false_fraction
    mean = f / (1.0 - f) * (1.0 - config.drop_fraction) * per_row
    counts = _random.poisson(mean, seed, _FALSE_COUNT, session_id, turn_index)
    anchor = np.repeat(np.arange(len(session_id), dtype=np.int64), counts)
    k = positions_in_groups(counts)
    offset = _random.uniform(seed, _FALSE_AT, session_id[anchor], turn_index[anchor], k) * \
        window_s[anchor]
    if anchor_arrival_s is None:
        trigger = anchor
    else:
        trigger, offset = np.full(len(anchor), -1, np.int64), anchor_arrival_s[anchor] + offset
    return Advisories(trigger, offset, session_id[anchor], turn_index[anchor] + 1,
                      np.full(len(anchor), -1, np.int64), np.zeros(len(anchor), bool))
