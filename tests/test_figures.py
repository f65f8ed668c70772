"""The figures run end to end at a tiny scale and write what they promise; the quick
reproduction's headline ordering holds; the CLI names what it rejects."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from symphony_jax import cli
from symphony_jax.engine.engine import StepRecord
from symphony_jax.figures import (ablations, figure, load_balance, main_result, real_check,
                                  redundancy)
from symphony_jax.figures.common import SLO_ATTAINMENT, Study
from symphony_jax.metrics import TransferRecords
from symphony_jax.workloads import ShareGPTLike

# Two nodes, a minute of users who read and type 20x faster than people.
TINY = dict(nodes=2, seconds=60.0, warmup_s=10.0, drain_s=10.0, think_speedup=20.0)


def rows_of(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def check_files(result, columns: set[str]) -> list[dict]:
    assert [p.suffix for p in result.files] == [".csv", ".png", ".md"]
    assert all(p.stat().st_size > 0 for p in result.files)
    assert result.files[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = rows_of(result.files[0])
    assert rows and columns <= set(rows[0])
    return rows


def test_redundancy(tmp_path):
    result = redundancy.run(tmp_path, quick=True, users=8, **TINY)
    rows = check_files(result, {"turn_index", "requests", "prefill_tokens",
                                "recomputed_tokens", "redundant_fraction"})
    fraction = np.array([float(r["redundant_fraction"]) for r in rows])
    assert rows[0]["turn_index"] == "0" and fraction[0] == 0  # a first turn has no history
    assert len(fraction) > 1 and (fraction[1:] > 0.3).all()


def test_main_result_load_balance_and_ablations(tmp_path):
    result = main_result.run(tmp_path, quick=True, systems=("recompute", "symphony"),
                             users=(4, 8), **TINY)
    rows = check_files(result, {"model", "system", "users", "normalized_latency_s.mean",
                                "tpot_s.mean", "ttft_s.p50", "ttft_s.p99", "slo_attainment"})
    assert {(r["system"], r["users"]) for r in rows} == {
        (s, u) for s in ("recompute", "symphony") for u in ("4", "8")}
    assert "max_users" in result.summary and "4x-8x" in result.summary
    rows = check_files(load_balance.run(tmp_path, quick=True, users=8, **TINY),
                       {"system", "imbalance_mean", "imbalance_p90", "paper"})
    assert [r["system"] for r in rows] == list(load_balance.SYSTEMS)
    rows = check_files(ablations.run(tmp_path, quick=True, users=8, **TINY),
                       {"case", "throughput_change", "tpot_change", "paper",
                        "migration.transfers_done_before_arrival_fraction"})
    assert rows[0]["case"] == "symphony" and float(rows[0]["throughput_change"]) == 0
    no_advisories = next(r for r in rows if r["case"] == "no advisories")
    assert float(no_advisories["migration.transfers_done_before_arrival_fraction"]) == 0
    assert {"no layer-wise loading", "10% missing advisories", "60% false advisories",
            "host tier / 8", "DRAM host + SSD disk", "DRAM host only"} <= {
        r["case"] for r in rows}


def test_real_check_times_each_step_to_the_next_with_the_admissions_before_it():
    busy, idle, none = np.array([1, 3]), np.array([0, 0]), np.array([5, 0])
    log = [StepRecord(0.00, busy, none, 0, 0.012), StepRecord(0.01, idle, none, 2),
           StepRecord(0.02, busy, none, 1, 0.035), StepRecord(0.03, busy, none, 0)]
    samples = real_check.samples_of([log, log[:1]])
    np.testing.assert_allclose(samples.seconds, [0.01, 0.01])  # the idle and last steps: none
    np.testing.assert_array_equal(samples.admitted, [2, 0])
    np.testing.assert_allclose(samples.report_lags, [0.002, 0.005])


def test_real_check_takes_the_median_migration_time_beyond_the_bytes():
    def runs(bytes_, start, end):
        n = len(bytes_)
        return TransferRecords(session_id=np.zeros(n, np.int64), request_id=np.zeros(n, np.int64),
                               src_node=np.zeros(n, np.int64), dst_node=np.ones(n, np.int64),
                               bytes=np.asarray(bytes_, np.int64), start_s=np.asarray(start),
                               end_s=np.asarray(end))
    second = real_check.LINK_BANDWIDTH  # bytes that take one second
    first = runs([0, second], [0.0, 1.0], [0.003, 2.005])  # 3 ms and 5 ms beyond their bytes
    unfinished = runs([0, 0], [0.0, 5.0], [0.004, np.nan])
    assert real_check.migration_latency([first, unfinished]) == pytest.approx(0.004)
    assert real_check.migration_latency([runs([], [], [])]) == 0.0
    assert real_check.migration_latency([runs([second], [0.0], [0.5])]) == 0.0  # faster: none


def test_real_check_serves_and_simulates_the_same_schedule(tmp_path):
    """The real cluster (1 node, 3 sessions) and the simulator calibrated on it: every metric
    of both, and the error between them."""
    result = real_check.run(tmp_path, quick=True, nodes=(1,), systems=("recompute",),
                            scale=(3, 2), repeats=2)
    rows = check_files(result, set(real_check.COLUMNS))
    assert [r["metric"] for r in rows] == [f"{name} {stat}" for name, _ in real_check.METRICS
                                          for stat in ("mean", "p90")]
    for r in rows:
        real, simulated = float(r["real_s"]), float(r["simulated_s"])
        assert real > 0 and simulated > 0 and float(r["real_spread"]) >= 0
        assert float(r["error"]) == pytest.approx(simulated / real - 1)
    assert "2 real runs" in result.summary and "fitted to" in result.summary


@pytest.mark.slow
def test_quick_reproduction_headline_ordering(tmp_path):
    """At the quick scale (two points of its sweep), symphony serves more users within the SLO
    than recompute and as many as sticky_offload, and the oracle at least as many as anyone."""
    result = main_result.run(tmp_path, quick=True, users=(384, 512))
    rows = [{**r, "users": int(r["users"]), "slo_attainment": float(r["slo_attainment"])}
            for r in rows_of(result.files[0])]
    served = {name: main_result.max_users(rows, name, "llama-2-13b")
              for name in main_result.QUICK_SYSTEMS}
    assert served["symphony"] > served["recompute"] > 0
    assert served["symphony"] >= served["sticky_offload"] > 0
    assert served["oracle"] == max(served.values())
    assert SLO_ATTAINMENT == 0.9


def test_a_study_takes_the_chat_shape_it_is_given():
    default = Study().schedule(64, 0).workload
    longer = Study(chat=ShareGPTLike(mean_turns=10.0)).schedule(64, 0).workload
    assert default.turns_per_session.mean() == pytest.approx(3.5, abs=0.2)
    assert longer.turns_per_session.mean() > 2 * default.turns_per_session.mean()  # truncated


def test_study_and_figure_names_are_checked():
    with pytest.raises(ValueError, match="unknown figure 'fig9'.*redundancy"):
        figure("fig9")
    with pytest.raises(ValueError, match="unknown workload 'alpaca'.*sharegpt"):
        Study(workload="alpaca")
    with pytest.raises(ValueError, match="Study.chat=.*not 'mooncake'"):
        Study(workload="mooncake", chat=ShareGPTLike())
    with pytest.raises(ValueError, match="Study.chat='long'"):
        Study(chat="long")
    with pytest.raises(ValueError, match="unknown GPU 'V100'"):
        Study(gpu="V100")
    with pytest.raises(ValueError, match="unknown model preset"):
        Study(model="gpt-5")


@pytest.mark.parametrize("argv, expected", [
    (["reproduce", "fig9"], "unknown figure 'fig9': expected one of redundancy, main_result"),
    (["simulate", "--system", "vllm", "--users", "4"], "unknown system 'vllm': expected one of"
                                                      " recompute"),
    (["simulate", "--system", "symphony", "--users", "4", "--workload", "alpaca"],
     "unknown workload 'alpaca': expected one of sharegpt, long_chat, mooncake, ragpulse"),
    (["bench", "nothing"], "unknown benchmark 'nothing': expected one of"),
])
def test_cli_rejects_unknown_names(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert expected in capsys.readouterr().err


def test_cli_simulate_prints_the_metrics(tmp_path, capsys):
    out = tmp_path / "requests.csv"
    assert cli.main(["simulate", "--system", "recompute", "--users", "4", "--nodes", "1",
                     "--seconds", "30", "--out", str(out)]) == 0
    assert "ttft_s.mean" in capsys.readouterr().out
    assert "request_id" in rows_of(out)[0]


@pytest.mark.parametrize("workload", ["mooncake", "ragpulse", "long_chat"])
def test_figures_run_on_the_real_traces_and_long_chats(tmp_path, workload):
    """Their prompts are long (documents, retrieved context): without the typing cap, no
    request of these users would arrive within the simulated minute."""
    result = main_result.run(tmp_path, quick=True, systems=("symphony",), users=(8,),
                             workload=workload, **TINY)
    (row,) = rows_of(result.files[0])
    assert float(row["finished"]) > 0 and np.isfinite(float(row["normalized_latency_s.mean"]))


def test_a_study_with_nothing_in_its_window_says_so(tmp_path):
    with pytest.raises(ValueError, match=r"no request \(sharegpt\) arrived in the measured "
                                         r"window \[50, 50\] s"):
        main_result.run(tmp_path, quick=True, systems=("recompute",), users=(2,),
                        **{**TINY, "warmup_s": 50.0, "think_speedup": 0.01})
