"""Metrics against hand-computed examples, including the edge cases."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from symphony_jax import metrics as M

nan = math.nan


def requests(**overrides):
    """Four requests: a normal one, a one-token one, a short one, one that never started."""
    columns = dict(
        request_id=[10, 11, 12, 13], session_id=[0, 0, 1, 2], turn_index=[0, 1, 0, 0],
        node=[0, 1, 0, -1], arrival_s=[0.0, 10.0, 1.0, 2.0], advisory_s=[nan, 5.0, nan, 2.5],
        first_token_s=[0.5, 10.25, 1.25, nan], finish_s=[1.5, 10.25, 3.25, nan],
        input_tokens=[100, 250, 50, 10], output_tokens=[11, 1, 5, 0],
        prefill_tokens=[100, 250, 50, 0], recomputed_tokens=[0, 150, 0, 0])
    columns.update(overrides)
    return M.RequestRecords(**columns)


def test_per_request_latencies_by_hand():
    r = requests()
    np.testing.assert_array_equal(M.ttft_s(r), [0.5, 0.25, 0.25, nan])
    np.testing.assert_array_equal(M.tpot_s(r), [0.1, nan, 0.5, nan])  # (1.5 - .5) / 10
    np.testing.assert_array_equal(M.e2e_latency_s(r), [1.5, 0.25, 2.25, nan])
    np.testing.assert_array_equal(M.normalized_latency_s(r), [1.5 / 11, 0.25, 0.45, nan])
    np.testing.assert_array_equal(M.advisory_lead_s(r), [nan, 5.0, nan, -0.5])


def test_distribution_uses_linear_percentiles_and_skips_nan():
    stats = M.distribution(np.array([4.0, nan, 1.0, 2.0, 3.0]), percentiles=(50, 90))
    # sorted 1, 2, 3, 4: p50 = 2.5; p90 at rank 0.9 * 3 = 2.7 -> 3 + 0.7 * (4 - 3)
    assert stats == {"count": 4.0, "mean": 2.5, "p50": 2.5, "p90": pytest.approx(3.7)}
    empty = M.distribution(np.array([nan]))
    assert empty["count"] == 0 and all(math.isnan(empty[k]) for k in ("mean", "p50", "p99"))


def test_tbt_by_hand_with_unordered_tokens():
    tokens = M.TokenRecords(request_id=[2, 1, 2, 1, 2, 3], time_s=[5.0, 1.0, 4.0, 1.5, 7.0, 9.0])
    assert sorted(M.tbt_s(tokens).tolist()) == [0.5, 1.0, 2.0]  # request 3: one token, no gap
    assert M.tbt_s(M.TokenRecords(request_id=[], time_s=[])).tolist() == []


def test_slo_attainment_and_goodput():
    r = requests()
    # TTFT <= 0.3: request 10 (0.5) misses, 11 and 12 meet, 13 never finished -> 2 / 4
    assert M.meets_slo(r, M.SLO(ttft_s=0.3)).tolist() == [False, True, True, False]
    assert M.slo_attainment(r, M.SLO(ttft_s=0.3)) == 0.5
    # TPOT <= 0.2: the one-token request passes, 12 (0.5) misses
    assert M.meets_slo(r, M.SLO(tpot_s=0.2)).tolist() == [True, True, False, False]
    assert M.slo_attainment(r, M.SLO(e2e_s=2.0, normalized_s=0.3)) == 0.5
    # window = [0, 10.25]: three finished requests
    t = M.throughput(r, slo=M.SLO(ttft_s=0.3))
    assert t["window_s"] == 10.25
    assert t["requests_per_s"] == pytest.approx(3 / 10.25)
    assert t["output_tokens_per_s"] == pytest.approx(17 / 10.25)
    assert t["prefill_tokens_per_s"] == pytest.approx(400 / 10.25)
    assert t["goodput_requests_per_s"] == pytest.approx(2 / 10.25)
    # an explicit window: only request 10 finishes in [0, 2]; requests 10, 12, 13 arrive in it
    assert M.throughput(r, window=(0.0, 2.0))["requests_per_s"] == 0.5
    assert M.slo_attainment(r, M.SLO(ttft_s=0.3), window=(0.0, 2.0)) == pytest.approx(1 / 3)
    # an unfinished request arriving after the last finish still counts against the SLO
    late = requests(arrival_s=[0.0, 10.0, 1.0, 20.0], advisory_s=[nan] * 4)
    assert M.summarize(late, slo=M.SLO(ttft_s=0.3))["slo_attainment"] == 0.5
    tokens = M.TokenRecords(request_id=[10, 10, 12], time_s=[0.5, 1.9, 2.5])
    assert M.throughput(r, window=(0.0, 2.0), tokens=tokens)["output_tokens_per_s"] == 1.0


def test_empty_windows_and_empty_records():
    r = requests()
    assert math.isnan(M.slo_attainment(r, M.SLO(ttft_s=1.0), window=(100.0, 200.0)))
    assert M.throughput(r, window=(100.0, 200.0))["requests_per_s"] == 0.0
    assert math.isnan(M.throughput(r, window=(5.0, 5.0))["requests_per_s"])
    empty = requests(**{k: [] for k in M.RequestRecords.__dataclass_fields__ if k != "name"})
    summary = M.summarize(empty, slo=M.SLO(ttft_s=1.0))
    assert summary["requests"] == 0 and summary["ttft_s.count"] == 0
    assert math.isnan(summary["ttft_s.p99"]) and math.isnan(summary["slo_attainment"])
    assert math.isnan(summary["redundant_fraction"])
    never = requests(finish_s=[nan] * 4, first_token_s=[nan] * 4, output_tokens=[0] * 4)
    assert M.throughput(never)["requests_per_s"] == 0.0  # window [0, 10]: nothing finished
    assert M.slo_attainment(never, M.SLO(e2e_s=100.0)) == 0.0


def test_redundant_tokens_overall_and_per_turn():
    r = requests(turn_index=[0, 1, 0, 2], recomputed_tokens=[0, 150, 0, 0])
    assert M.redundant_fraction(r) == 150 / 400
    table = M.redundant_by_turn(r)
    assert table["turn_index"].tolist() == [0, 1, 2]
    assert table["requests"].tolist() == [2, 1, 1]
    assert table["prefill_tokens"].tolist() == [150, 250, 0]
    np.testing.assert_array_equal(table["redundant_fraction"], [0.0, 0.6, nan])


def test_record_validation_names_the_field():
    with pytest.raises(ValueError, match=r"RequestRecords.request_id\[\d\]=.*unique"):
        requests(request_id=[1, 1, 2, 3])
    with pytest.raises(ValueError, match=r"finish_s\[2\]=1.0: expected >= first_token_s"):
        requests(finish_s=[1.5, 10.25, 1.0, nan])
    with pytest.raises(ValueError, match=r"finish_s\[3\]"):  # finished without a first token
        requests(finish_s=[1.5, 10.25, 3.25, 4.0])
    with pytest.raises(ValueError, match=r"first_token_s\[0\]"):
        requests(first_token_s=[-1.0, 10.25, 1.25, nan])
    with pytest.raises(ValueError, match=r"recomputed_tokens\[1\]"):
        requests(recomputed_tokens=[0, 251, 0, 0])
    with pytest.raises(ValueError, match=r"output_tokens\[1\]=0.*first token"):
        requests(output_tokens=[11, 0, 5, 0])
    with pytest.raises(ValueError, match="shape"):
        requests(node=[0, 1])
    with pytest.raises(ValueError, match=r"TransferRecords.end_s\[0\]"):
        M.TransferRecords(session_id=[0], request_id=[1], src_node=[0], dst_node=[1], bytes=[5],
                          start_s=[2.0], end_s=[1.0])


@pytest.mark.parametrize("suffix", ["csv", "json"])
def test_records_round_trip(tmp_path, suffix):
    r = requests(arrival_s=[0.1, 10.0 / 3, 1.0, 2.0], first_token_s=[0.5, 10.25, 1.25, nan])
    path = tmp_path / f"requests.{suffix}"
    getattr(r, f"to_{suffix}")(path)
    back = getattr(M.RequestRecords, f"from_{suffix}")(path)
    for name, column in r.columns().items():
        assert column.dtype == getattr(back, name).dtype
        np.testing.assert_array_equal(column, getattr(back, name))  # bit-exact, NaN kept
    steps = M.StepRecords(time_s=[0.5], node=[1], load=[3.0], device_bytes=[7], host_bytes=[0])
    getattr(steps, f"to_{suffix}")(tmp_path / f"steps.{suffix}")
    assert getattr(M.StepRecords, f"from_{suffix}")(tmp_path / f"steps.{suffix}").load[0] == 3.0


def test_csv_errors_name_the_problem(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("request_id,time_s\n1,0.5\n2\n")
    with pytest.raises(ValueError, match=r"t.csv:3: expected 2 fields"):
        M.TokenRecords.from_csv(path)
    path.write_text("request_id,when\n1,0.5\n")
    with pytest.raises(ValueError, match=r"t.csv:1: expected the columns"):
        M.TokenRecords.from_csv(path)
    path.write_text("request_id,time_s\none,0.5\n")
    with pytest.raises(ValueError, match=r"TokenRecords.request_id: expected int64"):
        M.TokenRecords.from_csv(path)


def test_load_timeline_and_imbalance_sample_and_hold():
    steps = M.StepRecords(time_s=[0.0, 0.0, 0.0, 1.5, 2.0, 3.2],
                          node=[0, 1, 2, 0, 1, 2], load=[4.0, 2.0, 2.0, 1.0, 0.0, 6.0],
                          device_bytes=[10, 20, 30, 40, 50, 60], host_bytes=[0] * 6)
    timeline = M.node_timeline(steps, "load", bin_s=1.0)
    assert timeline["time_s"].tolist() == [0.0, 1.0, 2.0, 3.0]
    np.testing.assert_array_equal(timeline["value"],
                                  [[4, 2, 2], [4, 2, 2], [1, 0, 2], [1, 0, 2]])
    np.testing.assert_array_equal(M.imbalance(timeline["value"]), [2.0, 2.0, 2.0, 2.0])
    late = M.node_timeline(steps, "load", bin_s=1.0, window=(-1.0, 4.0))["value"]
    assert np.isnan(late[0]).all() and late[-1].tolist() == [1, 0, 6]
    np.testing.assert_array_equal(M.imbalance(late), [nan, 2.0, 2.0, 2.0, 2.0, 6.0])
    idle = np.zeros((1, 3))
    assert np.isnan(M.imbalance(idle)).all()  # median 0: undefined
    summary = M.summarize(requests(), steps=steps, bin_s=1.0)
    assert summary["load_imbalance.mean"] == 2.0
    assert summary["device_bytes.peak_node"] == 60
    assert summary["device_bytes.peak_total"] == 40 + 50 + 30  # at t = 2, 3


def test_migration_timing_by_hand():
    r = requests()  # arrivals: 10 -> 0.0, 11 -> 10.0, 12 -> 1.0, 13 -> 2.0
    t = M.TransferRecords(
        session_id=[0, 0, 1, 2, 5, 2], request_id=[11, 11, 12, 13, -1, 13],
        src_node=[0, -1, 1, 0, 0, 0], dst_node=[1, 1, 0, 1, 2, 1],
        bytes=[100, 50, 80, 40, 30, 10], start_s=[4.0, 9.0, 0.0, 3.0, 1.0, 1.0],
        end_s=[6.0, 11.0, 2.0, nan, 2.0, nan])
    share = M.transfer_progress(t, r)
    # done before arrival: all; half (10 is midway through 9..11); half; 0 (started after
    # arrival, never finished); no request; unknown (never finished, started before)
    np.testing.assert_array_equal(share, [1.0, 0.5, 0.5, 0.0, nan, nan])
    summary = M.migration_summary(t, r)
    assert summary["bytes"] == 310 and summary["wasted_bytes"] == 30
    assert summary["bytes_done_before_arrival_fraction"] == pytest.approx(
        (100 + 25 + 40) / (100 + 50 + 80 + 40))
    assert summary["transfers_done_before_arrival_fraction"] == 0.25
    assert summary["mean_transfer_s"] == pytest.approx((2 + 2 + 2 + 1) / 4)
    assert summary["completed_transfers"] == 4


@settings(max_examples=40)
@given(st.lists(st.tuples(st.floats(0, 100), st.floats(0, 5), st.floats(0.001, 1.0),
                          st.integers(1, 30)), min_size=1, max_size=30))
def test_evenly_spaced_tokens_make_tbt_equal_tpot(rows):
    """A request whose tokens come every d seconds has TPOT d and TBT gaps of d."""
    arrival = np.array([a for a, _, _, _ in rows])
    first = arrival + [w for _, w, _, _ in rows]
    gap = np.array([d for _, _, d, _ in rows])
    count = np.array([n for _, _, _, n in rows])
    finish = first + gap * (count - 1)
    n = len(rows)
    r = M.RequestRecords(
        request_id=np.arange(n), session_id=np.arange(n), turn_index=np.zeros(n),
        node=np.zeros(n), arrival_s=arrival, advisory_s=np.full(n, nan), first_token_s=first,
        finish_s=finish, input_tokens=np.ones(n), output_tokens=count,
        prefill_tokens=np.ones(n), recomputed_tokens=np.zeros(n))
    ids = np.repeat(np.arange(n), count)
    times = np.concatenate([f + d * np.arange(c) for f, d, c in zip(first, gap, count)])
    tbt = M.tbt_s(M.TokenRecords(request_id=ids, time_s=times))
    assert len(tbt) == np.sum(count - 1)
    tpot = M.tpot_s(r)
    np.testing.assert_allclose(tpot[count > 1], gap[count > 1], rtol=1e-9)
    assert np.isnan(tpot[count == 1]).all()
    np.testing.assert_allclose(np.sort(tbt), np.sort(np.repeat(gap, count - 1)), rtol=1e-6,
                               atol=1e-9)


def test_summary_printer(capsys):
    M.print_summary(M.summarize(requests(), slo=M.SLO(ttft_s=0.3)))
    text = capsys.readouterr().out
    assert "slo_attainment" in text and "0.5" in text
    assert "ttft_s.p50" in text
    assert M.format_summary({"x": nan}).split()[-1] == "-"


@pytest.mark.parametrize("suffix", ["csv", "json"])
def test_tables_are_written_as_plain_files(tmp_path, suffix):
    table = M.redundant_by_turn(requests())
    path = tmp_path / f"turns.{suffix}"
    M.write_table(path, table)
    if suffix == "csv":
        assert path.read_text().splitlines()[:2] == [
            "turn_index,requests,prefill_tokens,recomputed_tokens,redundant_fraction",
            "0,3,150,0,0.0"]
    else:
        assert json.loads(path.read_text())["redundant_fraction"] == [0.0, 0.6]
    with pytest.raises(ValueError, match="equal-length"):
        M.write_table(path, {"a": [1, 2], "b": [1]})
    if suffix == "csv":  # a cell with a comma or a quote reads back as it was
        cells = {"case": ["DRAM, no disk", 'a "b"'], "value": [1.5, 2.0]}
        M.write_table(path, cells)
        back = M.read_csv_table(path, ["case", "value"])
        assert back["case"].tolist() == cells["case"]
        assert back["value"].tolist() == ["1.5", "2.0"]
    with pytest.raises(ValueError, match=".csv or .json"):
        M.write_table(tmp_path / "x.txt", table)
