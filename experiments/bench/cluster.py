"""Cluster benchmark: every system on the same closed-loop chat workload, on 4 nodes.

Four fake CPU devices (``--xla_force_host_platform_device_count=4``), one node each, the
``tiny`` model with small K,V pools (memory pressure), and a ShareGPT-like chat workload at
reduced scale: short turns, contexts capped at the model length, and think times about 20x a
person's (reading 7,200 and typing 5,400 words per minute) so that a run takes a minute. A
user's advisory comes when they start typing. Each system serves the same schedule; the table
gives requests served, TTFT and normalized latency (end-to-end per output token), the fraction
of prefilled tokens that recompute history, load imbalance (max/median of requests in service
over nodes, averaged over 0.1 s bins; and of requests served per node), and K,V bytes migrated,
with normalized latency as a ratio to ``recompute`` measured in the same run, and the
compilations the timed run's clock left out. CPU timings compare systems with each other
only. Each system runs in a fresh process (one process
compiling every system for four devices exhausts the executable mappings XLA:CPU may hold),
which first serves the schedule once untimed and compiles the steps any node ran on every node;
the timed run's clock leaves out what still compiles (``replay.timed_replays``): latencies
measure serving, not compilation.

Usage: ``python experiments/bench/cluster.py [--quick] [--out FILE.md]``.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import concurrent.futures  # noqa: E402
import datetime  # noqa: E402
import multiprocessing  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import _report  # noqa: E402  (beside this script)
from symphony_jax.cluster import SYSTEMS, Cluster, ClusterConfig  # noqa: E402
from symphony_jax.cluster.replay import timed_replays  # noqa: E402
from symphony_jax.config import (CacheConfig, EngineConfig, SchedulerConfig,  # noqa: E402
                                 model_preset)
from symphony_jax.model.params import init_params  # noqa: E402
from symphony_jax.workloads import ShareGPTLike, ThinkTime, closed_loop, sharegpt_like  # noqa: E402

NODES = 4
CONFIG = EngineConfig(model_preset("tiny"), CacheConfig(block_size=16, num_device_blocks=49),
                      SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256,
                                      max_model_len=512, num_slots=32))
CHAT = ShareGPTLike(mean_input_tokens=24, mean_output_tokens=16, max_context_tokens=448)
THINK = ThinkTime(reading_wpm=7_200, typing_wpm=5_400)


def served_imbalance(records) -> float:
    served = np.bincount(records.requests.node[records.requests.node >= 0], minlength=NODES)
    return float(served.max() / np.median(served)) if np.median(served) else float("nan")


def scale(quick: bool) -> tuple[int, int]:
    """(sessions, users)."""
    return (12, 4) if quick else (48, 16)


def serve(name: str, quick: bool) -> dict[str, float]:
    """Run ``name`` on the workload; its summary and requests-served imbalance."""
    sessions, users = scale(quick)
    schedule = closed_loop(sharegpt_like(sessions, CHAT, seed=0), users, think=THINK,
                           stagger_s=1.0, seed=0)
    config = ClusterConfig(CONFIG, num_nodes=NODES, devices=tuple(jax.devices()[:NODES]))
    params = init_params(CONFIG.model, jax.random.key(0))
    [(records, _)], (compiles, _) = timed_replays(
        schedule, lambda clock: Cluster(config, name, params, clock=clock))
    return {**records.summary(bin_s=0.1), "served_imbalance": served_imbalance(records),
            "migrated_bytes": float(records.transfers.bytes.sum()),
            "compiles_left_out": compiles}


def report(quick: bool) -> str:
    sessions, users = scale(quick)
    workload = sharegpt_like(sessions, CHAT, seed=0)
    spawn = multiprocessing.get_context("spawn")
    summaries = {}
    for name in SYSTEMS:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
            summaries[name] = pool.submit(serve, name, quick).result()
    lines = [f"{len(jax.devices())} devices ({jax.devices()[0].platform}), JAX {jax.__version__}, "
             f"{_report.machine()}, {datetime.date.today()}; {sessions} sessions "
             f"({workload.num_turns} requests), {users} users, {NODES} nodes of "
             f"{CONFIG.cache.num_device_blocks - 1} blocks x {CONFIG.cache.block_size} tokens",
             "",
             "| system | served | TTFT mean | TTFT p99 | norm. latency mean | vs recompute | "
             "redundant | imbalance (time) | imbalance (served) | migrated | compiles |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    baseline = None
    for name, s in summaries.items():
        latency = s["normalized_latency_s.mean"]
        baseline = baseline or latency
        lines.append(
            f"| {name} | {int(s['finished'])}/{int(s['requests'])} | "
            f"{s['ttft_s.mean'] * 1e3:.0f} ms | {s['ttft_s.p99'] * 1e3:.0f} ms | "
            f"{latency * 1e3:.1f} ms | {latency / baseline:.2f}x | "
            f"{s['redundant_fraction']:.1%} | {s['load_imbalance.mean']:.2f} | "
            f"{s['served_imbalance']:.2f} | {s['migrated_bytes'] / 2**20:.1f} MiB | "
            f"{s['compiles_left_out']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    return _report.main(__file__, __doc__, report, argv)


if __name__ == "__main__":
    main()
