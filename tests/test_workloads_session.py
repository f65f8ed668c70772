"""The session data model: Turn, Session and the columnar Workload."""

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from symphony_jax.workloads import Session, Turn, Workload


def test_history_and_prompt_tokens_by_hand():
    w = Workload.from_sessions([
        Session(7, (Turn(10, 5), Turn(3, 4), Turn(2, 1))),
        Session(2, (Turn(8, 8),)),
    ])
    # sorted by id: session 2 first
    assert w.session_id.tolist() == [2, 7, 7, 7]
    assert w.turn_index.tolist() == [0, 0, 1, 2]
    assert w.history_tokens.tolist() == [0, 0, 15, 22]
    assert w.prompt_tokens.tolist() == [8, 10, 18, 24]
    assert w.session_starts.tolist() == [0, 1, 4]
    assert w.session_ids.tolist() == [2, 7]
    assert w.turns_per_session.tolist() == [1, 3]


def test_round_trip_between_views():
    sessions = [Session(0, (Turn(4, 2, token_ids=(1, 2, 3, 4), text="abcd"), Turn(1, 1)),
                        arrival_s=(0.0, 5.5)),
                Session(3, (Turn(2, 9),), arrival_s=(1.0,))]
    w = Workload.from_sessions(sessions)
    assert list(w.sessions()) == sessions
    assert w.arrival_s.tolist() == [0.0, 5.5, 1.0]


def test_columns_are_read_only_and_validated():
    w = Workload([0, 0, 1], [1, 2, 3], [4, 5, 6])
    with pytest.raises(ValueError):
        w.input_tokens[0] = 9
    with pytest.raises(ValueError, match=r"Workload.input_tokens\[1\]=0: expected >= 1"):
        Workload([0, 0], [1, 0], [1, 1])
    with pytest.raises(ValueError, match=r"session_id\[2\]=0: expected rows grouped"):
        Workload([0, 1, 0], [1, 1, 1], [1, 1, 1])
    with pytest.raises(ValueError, match=r"output_tokens\[0\]=1.5: expected an integer"):
        Workload([0], [1], [1.5])
    with pytest.raises(ValueError, match="length 2"):
        Workload([0, 0], [1, 1], [1])
    with pytest.raises(ValueError, match=r"arrival_s\[1\]=1.0: expected >= the previous"):
        Workload([0, 0], [1, 1], [1, 1], arrival_s=[2.0, 1.0])


def test_turn_and_session_checks():
    with pytest.raises(ValueError, match="Turn.output_tokens=0"):
        Turn(1, 0)
    with pytest.raises(ValueError, match="Turn.token_ids"):
        Turn(3, 1, token_ids=(1, 2))
    with pytest.raises(ValueError, match="Session.turns"):
        Session(0, ())
    with pytest.raises(ValueError, match="Session.arrival_s"):
        Session(0, (Turn(1, 1), Turn(1, 1)), arrival_s=(3.0, 1.0))
    with pytest.raises(ValueError, match="distinct session ids"):
        Workload.from_sessions([Session(1, (Turn(1, 1),)), Session(1, (Turn(1, 1),))])


def test_empty_workload_and_selection():
    empty = Workload([], [], [])
    assert empty.num_sessions == 0 and empty.history_tokens.tolist() == []
    w = Workload([0, 0, 1, 2, 2], [1, 2, 3, 4, 5], [1, 1, 1, 1, 1])
    kept = w.select_sessions(np.array([True, False, True]))
    assert kept.session_id.tolist() == [0, 0, 2, 2]
    assert kept.prompt_tokens.tolist() == [1, 4, 4, 10]


def test_workloads_and_metrics_do_not_import_jax():
    code = ("import sys, symphony_jax.workloads, symphony_jax.workloads.traces, "
            "symphony_jax.metrics; print(any(m.split('.')[0] in ('jax', 'jaxlib') "
            "for m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"


@settings(max_examples=40)
@given(st.dictionaries(st.integers(-5, 50), st.lists(
    st.tuples(st.integers(1, 10**6), st.integers(1, 10**6)), min_size=1, max_size=6),
    max_size=8))
def test_views_round_trip_and_history_is_a_running_sum(sessions):
    objects = [Session(i, tuple(Turn(a, b) for a, b in turns)) for i, turns in sessions.items()]
    w = Workload.from_sessions(objects)
    assert list(w.sessions()) == sorted(objects, key=lambda s: s.session_id)
    for position, session in enumerate(w.sessions()):
        rows = slice(w.session_starts[position], w.session_starts[position + 1])
        running = 0
        for turn, history in zip(session.turns, w.history_tokens[rows]):
            assert history == running
            running += turn.input_tokens + turn.output_tokens
