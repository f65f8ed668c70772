"""The requests of a trace, as recorded, and their conversion to a multi-turn workload.

Every loader returns a ``TraceRequests``: one row per record, in file order, with the values
the trace records (a request's ``input_tokens`` is its whole prompt, history included where the
service sent the history). ``to_workload`` turns it into sessions of turns:

- Rows with a session id form that session, in timestamp order (ties: file order); rows
  without one (``session = -1``) become single-turn sessions with ids ``num_sessions + row``.
- A follow-up turn's new tokens are its recorded prompt minus what the session already holds
  (the previous turn's prompt and answer). Real traces are not strictly append-only (retrieval
  changes passages, clients truncate history, a regenerated answer branches the session), so
  the difference can be below 1; the turn then gets 1 new token, its prompt becomes the
  history plus that token, and ``clamped_follow_ups`` counts it.
- Arrival times are shifted so that the first request arrives at 0.
- A request with no output (a failure in BurstGPT) or no input cannot be a turn:
  ``to_workload`` raises, naming its line, unless ``drop_failed=True`` excludes such rows.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from symphony_jax.workloads._checks import cumsum_in_groups, positions_in_groups, run_lengths
from symphony_jax.workloads.session import Workload


@dataclasses.dataclass(frozen=True, eq=False)
class TraceRequests:
    """One row per trace record (N rows, file order). Times in seconds."""

    path: str  # the file it was read from
    line: np.ndarray  # i64[N]  1-based line of each record in the file
    timestamp_s: np.ndarray  # f64[N]  arrival (s; origin as the format defines it)
    input_tokens: np.ndarray  # i64[N]  prompt tokens as recorded (history included)
    output_tokens: np.ndarray  # i64[N]  generated tokens as recorded
    session: np.ndarray  # i64[N]  index into session_keys; -1: no session
    session_keys: tuple[str, ...] = ()  # the trace's own session ids
    columns: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # format-specific

    def __len__(self) -> int:
        return len(self.line)

    @property
    def num_sessions(self) -> int:
        return len(self.session_keys)


def to_workload(trace: TraceRequests, *, drop_failed: bool = False) -> Workload:
    """The trace's sessions as a ``Workload`` with arrival times (see the module docstring)."""
    order, session, prompt = _session_turns(trace, drop_failed)
    first = positions_in_groups(run_lengths(session)) == 0
    output = trace.output_tokens[order]
    held = np.where(first, 0, np.roll(prompt + output, 1))
    times = trace.timestamp_s[order]
    return Workload(session, prompt - held, output, times - times.min())


def clamped_follow_ups(trace: TraceRequests, *, drop_failed: bool = False) -> int:
    """Follow-up turns whose recorded prompt is shorter than their session's history + 1."""
    order, _, prompt = _session_turns(trace, drop_failed)
    return int(np.sum(prompt > trace.input_tokens[order]))


def _session_turns(trace: TraceRequests,
                   drop_failed: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Kept rows in (session, time, row) order, their session ids, and their workload prompts.

    The workload prompt of turn k is ``max(recorded prompt, prompt[k-1] + output[k-1] + 1)``:
    the recorded prompt when the trace grows append-only, else the shortest prompt that holds
    the history and one new token. With ``c[k]`` the sum of ``output + 1`` over earlier turns,
    ``prompt[k] - c[k]`` is a running maximum of ``recorded[k] - c[k]`` within the session.
    """
    keep = (trace.input_tokens > 0) & (trace.output_tokens > 0)
    if not drop_failed and not keep.all():
        bad = int(np.flatnonzero(~keep)[0])
        raise ValueError(
            f"{trace.path}:{int(trace.line[bad])}: a request with input_tokens="
            f"{int(trace.input_tokens[bad])}, output_tokens={int(trace.output_tokens[bad])} "
            f"cannot be a turn ({int((~keep).sum())} such rows); pass drop_failed=True to "
            "exclude them")
    rows = np.flatnonzero(keep)
    key = np.where(trace.session >= 0, trace.session,
                   trace.num_sessions + np.arange(len(trace), dtype=np.int64))
    order = rows[np.lexsort((rows, trace.timestamp_s[rows], key[rows]))]
    session = key[order]
    sizes = run_lengths(session)
    consumed = cumsum_in_groups(trace.output_tokens[order] + 1, sizes, exclusive=True)
    slack = trace.input_tokens[order] - consumed
    rank = np.repeat(np.arange(len(sizes)), sizes)
    low, span = (int(slack.min()), int(slack.max() - slack.min()) + 1) if len(slack) else (0, 1)
    if len(slack) and int(rank[-1]) * span >= 2**62:
        raise ValueError(f"{trace.path}: too many sessions or tokens for int64 arithmetic")
    lifted = slack - low + rank * span  # increasing from one session to the next
    slack = np.maximum.accumulate(lifted) - rank * span + low
    return order, session, slack + consumed


def inter_turn_gaps(trace: TraceRequests) -> np.ndarray:
    """f64: arrival-to-arrival gaps (s) between consecutive requests of each session.

    The gap includes the previous request's service time; it is what a trace observes.
    """
    rows = np.flatnonzero(trace.session >= 0)
    order = rows[np.lexsort((rows, trace.timestamp_s[rows], trace.session[rows]))]
    same = trace.session[order][1:] == trace.session[order][:-1]
    return np.diff(trace.timestamp_s[order])[same]


def turns_per_session(trace: TraceRequests) -> np.ndarray:
    """i64[S]: requests of each session of ``session_keys``."""
    counts = np.bincount(trace.session[trace.session >= 0], minlength=trace.num_sessions)
    return counts.astype(np.int64)
