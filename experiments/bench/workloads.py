"""Workloads and metrics benchmark: generation, schedules, trace loading, metrics at scale.

Times (best of ``repeats`` runs, wall clock, one process):

1. Generate 100k ShareGPT-like sessions; build their closed-loop schedule for 256 users with
   every advisory knob on; replay it (all events, given service times); the per-step call an
   executor makes (``after_finish`` on a batch of 32 finished rows); 100k agent jobs.
2. Load each shipped trace and convert the session traces to workloads.
3. Metrics over 1M requests: the per-request latencies and their percentiles, SLO and
   throughput, redundancy per turn, TBT over the token records, load imbalance and memory
   timelines over step records of 16 nodes, migration timing; and ``summarize`` doing all of it.

Usage: ``python experiments/bench/workloads.py [--quick] [--out FILE.md]`` (``--quick``: 10x
smaller sizes, a smoke test).
"""

from __future__ import annotations

import dataclasses
import datetime
import pathlib
import platform
import time
from collections.abc import Callable

import numpy as np

import _report  # beside this script
from symphony_jax import metrics as M
from symphony_jax import workloads as wl
from symphony_jax.workloads import traces

DATA = pathlib.Path(__file__).resolve().parents[1] / "data"


@dataclasses.dataclass(frozen=True)
class Sizes:
    sessions: int = 100_000
    users: int = 256
    jobs: int = 100_000
    requests: int = 1_000_000
    mean_tokens_recorded: int = 16  # output tokens per request in the token records
    nodes: int = 16
    steps_per_node: int = 100_000
    transfers: int = 300_000
    repeats: int = 3


QUICK = Sizes(sessions=10_000, users=64, jobs=10_000, requests=100_000, nodes=4,
              steps_per_node=10_000, transfers=30_000, repeats=1)


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_workloads(s: Sizes) -> list[tuple[str, str, float]]:
    rows = []
    w = wl.sharegpt_like(s.sessions, seed=0)
    rows.append((f"sharegpt_like: {s.sessions:,} sessions ({w.num_turns:,} turns)", "generate",
                 best_of(s.repeats, lambda: wl.sharegpt_like(s.sessions, seed=0))))
    config = wl.AdvisoryConfig(drop_fraction=0.1, false_fraction=0.3, late_fraction=0.1)
    think = wl.ThinkTime(extra=wl.ExponentialGap(10.0))
    build = lambda: wl.closed_loop(w, s.users, think=think, advisories=config, seed=0)
    schedule = build()
    rows.append((f"closed_loop: {s.users} users, all knobs ({len(schedule.advisories):,} "
                 "advisories)", "build", best_of(s.repeats, build)))
    service = w.output_tokens * 0.02
    rows.append(("replay: every event, given service times", "replay",
                 best_of(s.repeats, lambda: schedule.replay(service))))
    rng = np.random.default_rng(0)
    batches = [rng.choice(w.num_turns, 32, replace=False) for _ in range(1000)]
    per_call = best_of(s.repeats, lambda: [schedule.after_finish(b, 100.0) for b in batches])
    rows.append(("after_finish: 32 finished rows per call", "per call", per_call / len(batches)))
    graph = wl.metagpt_graph()
    rows.append((f"agent_schedule: {s.jobs:,} MetaGPT-like jobs", "build",
                 best_of(s.repeats, lambda: wl.agent_schedule(graph, s.jobs, seed=0))))
    return rows


def bench_traces() -> list[tuple[str, str, float]]:
    cases = [("mooncake/conversation_trace.jsonl", traces.load_mooncake),
             ("mooncake/conversation_trace_sessions_reconstructed.csv",
              traces.load_mooncake_sessions),
             ("ragpulse/0_trace.jsonl", traces.load_ragpulse),
             ("azure_llm_2023/AzureLLMInferenceTrace_conv.csv", traces.load_azure)]
    rows = []
    for name, load in cases:
        trace = load(DATA / name)
        rows.append((f"{name} ({len(trace):,} rows)", "load + to_workload",
                     best_of(1, lambda: traces.to_workload(load(DATA / name)))))
    return rows


def synthetic_records(s: Sizes, seed: int = 0):
    """1M-request records shaped like a serving run (times in s, sizes in bytes)."""
    rng = np.random.default_rng(seed)
    n = s.requests
    arrival = np.sort(rng.uniform(0, 3600, n))
    first = arrival + rng.exponential(0.3, n)
    output = rng.geometric(1 / s.mean_tokens_recorded, n)
    tpot = rng.uniform(0.015, 0.05, n)
    finish = first + tpot * (output - 1)
    unfinished = rng.random(n) < 0.01
    finish[unfinished] = np.nan
    prompt = rng.integers(50, 4000, n)
    turn = rng.geometric(0.3, n) - 1
    recomputed = np.where(turn > 0, prompt // 2, 0)
    requests = M.RequestRecords(
        request_id=np.arange(n), session_id=rng.integers(0, n // 3, n), turn_index=turn,
        node=rng.integers(0, s.nodes, n), arrival_s=arrival,
        advisory_s=np.where(rng.random(n) < 0.9, arrival - rng.exponential(11.3, n), np.nan),
        first_token_s=first, finish_s=finish, input_tokens=prompt, output_tokens=output,
        prefill_tokens=prompt, recomputed_tokens=recomputed)
    step = np.arange(output.sum()) - np.repeat(np.cumsum(output) - output, output)
    tokens = M.TokenRecords(request_id=np.repeat(requests.request_id, output),
                            time_s=np.repeat(first, output) + np.repeat(tpot, output) * step)
    k = s.nodes * s.steps_per_node
    steps = M.StepRecords(time_s=np.tile(np.linspace(0, 3600, s.steps_per_node), s.nodes),
                          node=np.repeat(np.arange(s.nodes), s.steps_per_node),
                          load=rng.poisson(20, k).astype(float),
                          device_bytes=rng.integers(0, 60 << 30, k),
                          host_bytes=rng.integers(0, 200 << 30, k))
    start = rng.uniform(0, 3600, s.transfers)
    transfers = M.TransferRecords(
        session_id=rng.integers(0, n // 3, s.transfers),
        request_id=np.where(rng.random(s.transfers) < 0.8, rng.integers(0, n, s.transfers), -1),
        src_node=rng.integers(-1, s.nodes, s.transfers),
        dst_node=rng.integers(0, s.nodes, s.transfers),
        bytes=rng.integers(1 << 20, 1 << 30, s.transfers), start_s=start,
        end_s=start + rng.exponential(0.2, s.transfers))
    return requests, tokens, steps, transfers


def bench_metrics(s: Sizes) -> list[tuple[str, str, float]]:
    requests, tokens, steps, transfers = synthetic_records(s)
    slo = M.SLO(ttft_s=1.0, tpot_s=0.04)
    latencies = lambda: [M.distribution(f(requests)) for f in
                         (M.ttft_s, M.tpot_s, M.e2e_latency_s, M.normalized_latency_s)]
    cases = [
        ("TTFT, TPOT, end-to-end, normalized: percentiles", latencies),
        ("SLO attainment, throughput and goodput",
         lambda: (M.slo_attainment(requests, slo), M.throughput(requests, slo=slo))),
        ("redundant tokens, overall and per turn",
         lambda: (M.redundant_fraction(requests), M.redundant_by_turn(requests))),
        (f"TBT over {len(tokens):,} token records", lambda: M.distribution(M.tbt_s(tokens))),
        (f"load imbalance, {len(steps):,} step records (1 s grid)",
         lambda: M.imbalance(M.node_timeline(steps, "load", 1.0)["value"])),
        (f"migration timing, {len(transfers):,} transfers",
         lambda: M.migration_summary(transfers, requests)),
        ("summarize: all of the above",
         lambda: M.summarize(requests, tokens=tokens, steps=steps, transfers=transfers,
                             slo=slo)),
    ]
    prefix = f"{s.requests:,} requests: "
    return [(prefix + name, "compute", best_of(s.repeats, fn)) for name, fn in cases]


def report(s: Sizes) -> str:
    rows = bench_workloads(s) + bench_traces() + bench_metrics(s)
    lines = [f"{_report.machine()}, Python {platform.python_version()}, numpy {np.__version__}, "
             f"{datetime.date.today().isoformat()}. Best of {s.repeats} run(s).", "",
             "| what | step | time |", "|---|---|---|"]
    for name, step, seconds in rows:
        shown = f"{seconds * 1e6:,.1f} us" if seconds < 1e-3 else f"{seconds:,.3f} s"
        lines.append(f"| {name} | {step} | {shown} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    return _report.main(__file__, __doc__, lambda quick: report(QUICK if quick else Sizes()),
                        argv)


if __name__ == "__main__":
    main()
