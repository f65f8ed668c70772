"""Simulator speed: simulated seconds per wall-clock second on the main figure's setting.

One point of the main figure: 8 nodes of one A100-80GB each serving Llama-3.1-8B (roofline
cost model, data-sheet peaks), 512 closed-loop users of a ShareGPT-like chat workload with
human reading and typing times, 10 simulated minutes, for ``recompute`` and ``symphony``. Every
node runs the real jitted scheduler; the table gives the wall time (compilation excluded: each
system first simulates a few seconds), simulated seconds per wall second, node steps per wall
second, and requests finished. ``--quick``: 2 nodes, 64 users, 300 simulated seconds.

Usage: ``python experiments/bench/sim.py [--quick] [--out FILE.md]``.
"""

from __future__ import annotations

import datetime
import time

import jax

import _report  # beside this script
from symphony_jax.config import SchedulerConfig, model_preset
from symphony_jax.sim import Geometry, Roofline, gpu
from symphony_jax.sim.simulator import SimConfig, Simulator
from symphony_jax.workloads import ShareGPTLike, ThinkTime, closed_loop, sharegpt_like

MODEL, GPU = model_preset("llama-3.1-8b"), gpu("A100-80GB")
SCHEDULER = SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=2048, max_model_len=8192,
                            num_slots=1024)
CHAT = ShareGPTLike(max_context_tokens=7000)


def scale(quick: bool) -> tuple[int, int, float]:
    """(nodes, users, simulated seconds)."""
    return (2, 64, 300.0) if quick else (8, 512, 600.0)


def warm_up(name: str, config: SimConfig, cost) -> None:
    """Compile what a run meets: a few seconds of users who never pause."""
    fast = ThinkTime(reading_wpm=1e9, typing_wpm=1e9)
    schedule = closed_loop(sharegpt_like(64, CHAT, seed=1), 32, think=fast, stagger_s=0.1)
    Simulator(schedule, name, config, cost).run(until_s=5.0)


def measure(name: str, quick: bool) -> dict[str, float]:
    nodes, users, until = scale(quick)
    schedule = closed_loop(sharegpt_like(users * 8, CHAT, seed=0), users, stagger_s=30.0,
                           seed=0)
    config = SimConfig.for_gpu(MODEL, GPU, SCHEDULER, num_nodes=nodes)
    cost = Roofline(Geometry.of(MODEL), GPU)
    warm_up(name, config, cost)
    sim = Simulator(schedule, name, config, cost)
    start = time.perf_counter()
    records = sim.run(until_s=until)
    wall = time.perf_counter() - start
    steps = sum(n.steps for n in sim.nodes)
    finished = int(records.summary()["finished"])
    return {"wall": wall, "speed": until / wall, "steps": steps / wall, "finished": finished,
            "requests": len(records.requests)}


def report(quick: bool) -> str:
    nodes, users, until = scale(quick)
    lines = [f"JAX {jax.__version__}, {_report.machine()}, {datetime.date.today()}; {nodes} x "
             f"{GPU.name}, Llama-3.1-8B, {users} users, {until:.0f} simulated s",
             "",
             "| system | wall | simulated s / wall s | node steps / wall s | requests finished |",
             "|---|---|---|---|---|"]
    for name in ("recompute", "symphony"):
        m = measure(name, quick)
        lines.append(f"| {name} | {m['wall']:.1f} s | {m['speed']:.2f} | {m['steps']:.0f} | "
                     f"{m['finished']}/{m['requests']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    return _report.main(__file__, __doc__, report, argv)


if __name__ == "__main__":
    main()
