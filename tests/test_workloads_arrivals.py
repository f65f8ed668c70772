"""Chat schedules: closed loop against a plain event-loop reference, open loop, advisory knobs."""

import dataclasses
import heapq
import pathlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from symphony_jax.workloads import (ADVISORY, ARRIVAL, Advisories, AdvisoryConfig, EmpiricalGap,
                                    ExponentialGap, NoGap, Schedule, ThinkTime, Workload,
                                    closed_loop, open_loop, sharegpt_like, traces)

THINK = ThinkTime(reading_wpm=240.0, typing_wpm=60.0, tokens_per_word=1.0)  # 0.25 s, 1 s a token

sessions_strategy = st.lists(
    st.lists(st.tuples(st.integers(1, 200), st.integers(1, 200)), min_size=1, max_size=4),
    min_size=1, max_size=10)


def workload_of(sessions) -> Workload:
    ids = [i for i, turns in enumerate(sessions) for _ in turns]
    flat = [t for turns in sessions for t in turns]
    return Workload(ids, [t[0] for t in flat], [t[1] for t in flat])


def reference_closed_loop(w: Workload, num_users: int, service: np.ndarray, think: ThinkTime):
    """Arrivals and advisory times by walking each user's turns in plain Python (no extra gap,
    no stagger): after a finish, read the answer, then type the next prompt (pasting it if
    typing would take longer than ``think.max_typing_s``)."""
    arrival, advisory = {}, {}
    for user in range(num_users):
        clock, previous_output = 0.0, None
        for position in range(user, w.num_sessions, num_users):
            for row in range(w.session_starts[position], w.session_starts[position + 1]):
                reading = 0.0 if previous_output is None else \
                    previous_output * 60.0 / think.tokens_per_word / think.reading_wpm
                typing = min(w.input_tokens[row] * 60.0 / think.tokens_per_word /
                             think.typing_wpm, think.max_typing_s)
                advisory[row] = clock + reading
                arrival[row] = clock + reading + typing
                clock = arrival[row] + service[row]
                previous_output = w.output_tokens[row]
    return arrival, advisory


@settings(max_examples=40)
@given(sessions=sessions_strategy, num_users=st.integers(1, 4),
       service=st.lists(st.floats(0.0, 50.0), min_size=40, max_size=40),
       max_typing_s=st.sampled_from([np.inf, 30.0, 0.5]))
def test_closed_loop_matches_a_plain_event_loop(sessions, num_users, service, max_typing_s):
    w = workload_of(sessions)
    service = np.asarray(service[:w.num_turns])
    think = dataclasses.replace(THINK, max_typing_s=max_typing_s)
    schedule = closed_loop(w, num_users, think=think, stagger_s=0.0)
    events, arrival = schedule.replay(service)
    want_arrival, want_advisory = reference_closed_loop(w, num_users, service, think)
    np.testing.assert_allclose(arrival, [want_arrival[r] for r in range(w.num_turns)],
                               rtol=1e-12, atol=1e-9)
    advisories = events.kind == ADVISORY
    assert np.all(events.row[advisories] >= 0)  # no knob: every advisory is true
    np.testing.assert_allclose(events.time_s[advisories],
                               [want_advisory[r] for r in events.row[advisories]], atol=1e-9)
    assert np.all(np.diff(events.time_s) >= 0)
    assert sorted(events.row[events.kind == ARRIVAL]) == list(range(w.num_turns))


def drive(schedule, service):
    """A minimal executor: serve each arrival for service[row] seconds, feed finishes back."""
    queue = []
    push = lambda ev: [heapq.heappush(queue, (t, k, r, i)) for i, (t, k, r) in
                       enumerate(zip(ev.time_s, ev.kind, ev.row))]
    push(schedule.initial_events())
    arrivals, advisories = {}, []
    while queue:
        time, kind, row, _ = heapq.heappop(queue)
        if kind == ARRIVAL:
            arrivals[row] = time
            heapq.heappush(queue, (time + service[row], 2, row, 0))
        elif kind == ADVISORY:
            advisories.append((time, row))
        else:  # a finish
            push(schedule.after_finish([row], time))
    return arrivals, sorted(advisories)


@settings(max_examples=25)
@given(sessions=sessions_strategy, num_users=st.integers(1, 3), seed=st.integers(0, 99),
       service=st.lists(st.floats(0.0, 30.0), min_size=40, max_size=40))
def test_after_finish_reproduces_replay(sessions, num_users, seed, service):
    w = workload_of(sessions)
    service = np.asarray(service[:w.num_turns])
    config = AdvisoryConfig(drop_fraction=0.3, false_fraction=0.4, late_fraction=0.3,
                            late_lead_s=-0.5, lead_scale=2.0)
    schedule = closed_loop(w, num_users, think=ThinkTime(extra=ExponentialGap(5.0)),
                           advisories=config, seed=seed)
    arrivals, advisories = drive(schedule, service)
    events, arrival = schedule.replay(service)
    np.testing.assert_allclose([arrivals[r] for r in range(w.num_turns)], arrival, atol=1e-6)
    adv = events.kind == ADVISORY
    assert len(advisories) == adv.sum()
    np.testing.assert_allclose([t for t, _ in advisories], np.sort(events.time_s[adv]),
                               atol=1e-6)


@settings(max_examples=30)
@given(sessions=sessions_strategy, scale=st.floats(0.1, 5.0), seed=st.integers(0, 99),
       service=st.lists(st.floats(0.0, 30.0), min_size=40, max_size=40))
def test_advisory_precedes_its_request_by_the_scaled_typing_time(sessions, scale, seed,
                                                                 service):
    w = workload_of(sessions)
    service = np.asarray(service[:w.num_turns])
    think = ThinkTime(extra=ExponentialGap(3.0))
    schedule = closed_loop(w, 3, think=think, advisories=AdvisoryConfig(lead_scale=scale),
                           seed=seed)
    events, arrival = schedule.replay(service)
    adv = events.kind == ADVISORY
    target = events.row[adv]
    prev = schedule.prev_row[target]
    earliest = np.where(prev >= 0, arrival[np.maximum(prev, 0)] + service[np.maximum(prev, 0)],
                        0.0)
    expected = np.maximum(arrival[target] - scale * think.typing_s(w.input_tokens[target]),
                          earliest)
    np.testing.assert_allclose(events.time_s[adv], expected, atol=1e-9)
    # think gaps are never negative: a turn arrives after its predecessor finished
    has_prev = schedule.prev_row >= 0
    assert np.all(arrival[has_prev] >= (arrival + service)[schedule.prev_row[has_prev]] - 1e-9)


def test_same_seed_same_schedule_and_sessions_independent_of_users():
    w = sharegpt_like(300, seed=4)
    think = ThinkTime(extra=ExponentialGap(20.0))
    config = AdvisoryConfig(drop_fraction=0.2, false_fraction=0.3)
    a = closed_loop(w, 8, think=think, advisories=config, seed=1)
    b = closed_loop(w, 8, think=think, advisories=config, seed=1)
    c = closed_loop(w, 13, think=think, advisories=config, seed=1)
    d = closed_loop(w, 8, think=think, advisories=config, seed=2)
    assert np.array_equal(a.gap_s, b.gap_s)
    assert np.array_equal(a.advisories.offset_s, b.advisories.offset_s)
    follow = w.turn_index > 0  # their think time depends on their own session only
    assert np.array_equal(a.gap_s[follow], c.gap_s[follow])
    true_a = np.sort(a.advisories.target_row[a.advisories.target_row >= 0])
    true_c = np.sort(c.advisories.target_row[c.advisories.target_row >= 0])
    assert np.array_equal(true_a, true_c)  # the same turns lose their advisory
    assert not np.array_equal(a.gap_s[follow], d.gap_s[follow])


def test_knob_rates_within_statistical_bounds():
    w = sharegpt_like(8000, seed=0)
    n = w.num_turns
    config = AdvisoryConfig(drop_fraction=0.2, false_fraction=0.6, late_fraction=0.25)
    adv = closed_loop(w, 64, advisories=config, seed=3).advisories
    true = adv.target_row >= 0
    sigma = lambda p, m: 5 * np.sqrt(p * (1 - p) / m)
    assert abs((n - true.sum()) / n - 0.2) < sigma(0.2, n)
    assert abs(adv.late[true].mean() - 0.25) < sigma(0.25, true.sum())
    assert abs((~true).mean() - 0.6) < 0.02
    assert not adv.late[~true].any()
    assert len(np.unique(adv.target_row[true])) == true.sum()  # at most one true per turn


def test_default_mean_lead_is_the_papers_11_3_seconds():
    w = sharegpt_like(50_000, seed=0)
    schedule = closed_loop(w, 256)
    events, arrival = schedule.replay(np.full(w.num_turns, 10.0))
    adv = events.kind == ADVISORY
    lead = arrival[events.row[adv]] - events.time_s[adv]
    assert lead.mean() == pytest.approx(11.3, rel=0.03)


def test_open_loop_uses_timestamps_and_clips_leads_at_the_previous_turn():
    w = Workload([0, 0, 1], [10, 100, 1], [5, 5, 5], arrival_s=[0.0, 4.0, 2.0])
    think = ThinkTime(typing_wpm=60.0, tokens_per_word=1.0)  # 1 s per token
    schedule = open_loop(w, think=think, time_scale=0.5)
    assert not schedule.closed_loop
    events, arrival = schedule.replay()
    assert arrival.tolist() == [0.0, 2.0, 1.0]
    adv = events.kind == ADVISORY
    # row 0: lead 10 s clipped at time 0; row 1: 100 s clipped at row 0's arrival; row 2: 1 s
    assert dict(zip(events.row[adv], events.time_s[adv])) == {0: 0.0, 1: 0.0, 2: 0.0}
    assert np.array_equal(events.time_s, np.sort(events.time_s))
    assert events.kind.tolist() == [ADVISORY] * 3 + [ARRIVAL] * 3  # advisories first at t = 0
    with pytest.raises(ValueError, match="open_loop.workload.arrival_s"):
        open_loop(Workload([0], [1], [1]))


def test_open_loop_false_and_late_advisories():
    w = sharegpt_like(3000, seed=2)
    timed = Workload(w.session_id, w.input_tokens, w.output_tokens,
                     arrival_s=np.arange(w.num_turns) * 30.0)
    config = AdvisoryConfig(false_fraction=0.5, late_fraction=1.0, late_lead_s=-1.0)
    events, arrival = open_loop(timed, advisories=config, seed=5).replay()
    adv = events.kind == ADVISORY
    real = adv & (events.row >= 0)
    np.testing.assert_allclose(events.time_s[real], arrival[events.row[real]] + 1.0)
    assert events.late[real].all()
    false = events.is_false
    assert abs(false.sum() / adv.sum() - 0.5) < 0.03


def test_bad_arguments_are_named():
    w = Workload([0], [1], [1])
    with pytest.raises(ValueError, match="closed_loop.num_users=0"):
        closed_loop(w, 0)
    with pytest.raises(ValueError, match="AdvisoryConfig.drop_fraction=1.5"):
        AdvisoryConfig(drop_fraction=1.5)
    with pytest.raises(ValueError, match="ThinkTime.typing_wpm=0"):
        ThinkTime(typing_wpm=0)
    with pytest.raises(ValueError, match="ThinkTime.max_typing_s=0"):
        ThinkTime(max_typing_s=0.0)
    with pytest.raises(ValueError, match="replay.service_s"):
        closed_loop(Workload([0, 0], [1, 1], [1, 1]), 1).replay()
    with pytest.raises(ValueError, match="after_finish.rows"):
        closed_loop(w, 1).after_finish([5], [1.0])


@settings(max_examples=15)
@given(drop=st.floats(0.0, 1.0), false=st.floats(0.0, 0.9), seed=st.integers(0, 2**31))
def test_drop_and_false_counts_within_bounds_for_any_rates(drop, false, seed):
    w = sharegpt_like(1500, seed=seed)
    n = w.num_turns
    adv = closed_loop(w, 16, advisories=AdvisoryConfig(drop_fraction=drop,
                                                       false_fraction=false), seed=seed).advisories
    sent_true = np.sum(adv.target_row >= 0)
    expected_false = n * false * (1 - drop) / (1 - false)
    assert abs(sent_true - n * (1 - drop)) <= 6 * np.sqrt(n * drop * (1 - drop)) + 1
    assert abs(np.sum(adv.target_row < 0) - expected_false) <= 6 * np.sqrt(expected_false) + 1


def test_schedule_rejects_inconsistent_chains():
    w = Workload([0, 0], [1, 1], [1, 1])
    none = Advisories([], [], [], [], [], [])
    with pytest.raises(ValueError, match=r"chain_step\[1\]=2: expected 0, 1, 2"):
        Schedule(w, chain=[0, 0], chain_step=[0, 2], gap_s=[0.0, 1.0], advisories=none)
    with pytest.raises(ValueError, match=r"row 1.*to come after the session's previous turn"):
        Schedule(Workload([0, 0, 1], [1, 1, 1], [1, 1, 1]), chain=[0, 1, 1],
                 chain_step=[0, 0, 1], gap_s=[0.0, 1.0, 1.0], advisories=none)
    with pytest.raises(ValueError, match="Schedule.gap_s"):
        Schedule(w, chain=[0, 0], chain_step=[0, 1], gap_s=[0.0, -1.0], advisories=none)
    wrong = Advisories([-1], [0.0], [0], [0], [1], [False])  # row 1 is turn 1, not turn 0
    with pytest.raises(ValueError, match="the session and turn of each target"):
        Schedule(w, chain=[0, 0], chain_step=[0, 1], gap_s=[0.0, 1.0], advisories=wrong)


def test_extra_gaps_exponential_and_empirical_from_a_trace():
    ragpulse = traces.load_ragpulse(pathlib.Path(__file__).resolve().parents[1] / "experiments" /
                                    "data" / "ragpulse" / "0_trace.jsonl")
    observed = traces.inter_turn_gaps(ragpulse)
    w = sharegpt_like(20_000, seed=1)
    follow = w.turn_index > 0
    base = closed_loop(w, 100, think=ThinkTime(extra=NoGap()), seed=7).gap_s[follow]
    for extra in (ExponentialGap(30.0), EmpiricalGap(observed)):
        gap = closed_loop(w, 100, think=ThinkTime(extra=extra), seed=7).gap_s[follow]
        added = gap - base
        assert added.min() >= 0
        if isinstance(extra, EmpiricalGap):
            assert np.isin(np.round(added, 6), np.round(observed, 6)).all()
            assert np.median(added) == pytest.approx(np.median(observed), rel=0.1)
        else:
            assert added.mean() == pytest.approx(30.0, rel=0.05)
    with pytest.raises(ValueError, match="EmpiricalGap.samples_s"):
        EmpiricalGap(np.array([]))
