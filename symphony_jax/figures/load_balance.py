"""Load balance: requests in service on each node over time, and max/median imbalance, for a
sticky system, SYMPHONY and the stateless one (the paper: 3.1x max/median with InferCept's
session-sticky offloading against 1.2x)."""

from __future__ import annotations

import dataclasses

import numpy as np

from symphony_jax import metrics
from symphony_jax.figures.common import Figure, Study, table, write
from symphony_jax.progress import bar as progress_bar

NAME = "load_balance"
SYSTEMS = ("sticky_offload", "symphony", "recompute")
PAPER = {"sticky_offload": 3.1, "symphony": 1.2}  # max/median (InferCept, SYMPHONY)


def study(quick: bool, **overrides) -> tuple[Study, int]:
    base = (Study(model="llama-2-13b", max_model_len=4096, nodes=4, seconds=180.0,
                  warmup_s=60.0, think_speedup=4.0) if quick else Study())
    return dataclasses.replace(base, **overrides), (256 if quick else 512)


def run(out, *, quick: bool = False, seed: int = 0, progress: bool = False,
        users: int | None = None, **overrides) -> Figure:
    """``overrides``: ``Study`` fields."""
    s, default_users = study(quick, **overrides)
    users = users or default_users
    timelines, rows = {}, []
    bar = progress_bar(len(SYSTEMS), progress, unit="run")
    for name in SYSTEMS:
        records = s.simulate(name, users, seed)
        s.check_window(records)
        timeline = metrics.node_timeline(records.steps, "load", 1.0,
                                         window=(s.warmup_s, s.seconds))
        ratio = metrics.imbalance(timeline["value"])
        timelines[name] = timeline
        rows.append({"system": name, "imbalance_mean": float(np.nanmean(ratio)),
                     "imbalance_p90": float(np.nanpercentile(ratio, 90)),
                     "paper": PAPER.get(name, float("nan"))})
        bar.update(1)
    bar.close()
    summary = "\n".join([
        f"# Per-node load over time ({users} users, {s.nodes} nodes, {s.workload})", "",
        "Load: requests in service on a node (running or queued there), sampled each second "
        f"from {s.warmup_s:.0f} s on; imbalance = max / median over nodes. The paper's column "
        "is its reported max/median (InferCept for the sticky system).", "",
        table(rows, ["system", "imbalance_mean", "imbalance_p90", "paper"])])

    def plot(plt):
        figure, axes = plt.subplots(1, len(SYSTEMS), figsize=(4.5 * len(SYSTEMS), 3.2),
                                    sharey=True)
        for ax, name in zip(axes, SYSTEMS):
            t = timelines[name]
            ax.plot(t["time_s"], t["value"], linewidth=0.8)
            ax.set(title=name, xlabel="time (s)")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("requests in service per node")
        figure.tight_layout()
        return figure

    return write(out, NAME, rows, summary, plot)
