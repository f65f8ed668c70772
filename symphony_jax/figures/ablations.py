"""Ablations of SYMPHONY: layer-wise loading off (the paper: about -18% throughput at heavy
load), 10% and 20% missing advisories (TPOT 21.3 -> 24.4 ms at 10%), 60% false advisories (-2.1%
throughput), advisories' lead time scaled, and the memory tiers: a host tier 8x smaller, and
the paper's DRAM and SSD (per GPU) as host and disk tiers, or DRAM alone."""

from __future__ import annotations

import dataclasses

from symphony_jax.cluster.systems import SYSTEMS
from symphony_jax.figures.common import DRAM_AND_SSD, Figure, Study, sweep, table, write
from symphony_jax.workloads import AdvisoryConfig

NAME = "ablations"
SYMPHONY = SYSTEMS["symphony"]
NO_LAYERWISE = dataclasses.replace(
    SYMPHONY, name="symphony_no_layerwise",
    policy=dataclasses.replace(SYMPHONY.policy, layerwise_loading=False))
PAPER = {"no layer-wise loading": "-18.4% throughput", "10% missing advisories":
         "TPOT 21.3 -> 24.4 ms (+14.6%)", "60% false advisories": "-2.1% throughput"}


def study(quick: bool, **overrides) -> tuple[Study, int]:
    base = (Study(model="llama-2-13b", max_model_len=4096, nodes=2, seconds=180.0,
                  warmup_s=60.0, drain_s=40.0, think_speedup=4.0) if quick else Study())
    return dataclasses.replace(base, **overrides), (384 if quick else 512)


def cases(users: int) -> list[tuple[str, dict]]:
    advised = lambda **kw: {"system": SYMPHONY, "users": users,
                            "advisories": AdvisoryConfig(**kw)}
    return [("symphony", advised()),
            ("no layer-wise loading", {"system": NO_LAYERWISE, "users": users}),
            ("10% missing advisories", advised(drop_fraction=0.1)),
            ("20% missing advisories", advised(drop_fraction=0.2)),
            ("60% false advisories", advised(false_fraction=0.6)),
            ("advisory lead x0.1", advised(lead_scale=0.1)),
            ("advisory lead x0", advised(lead_scale=0.0)),
            ("no advisories", advised(drop_fraction=1.0))]


def run(out, *, quick: bool = False, seed: int = 0, progress: bool = False,
        users: int | None = None, **overrides) -> Figure:
    """``overrides``: ``Study`` fields."""
    s, default_users = study(quick, **overrides)
    users = users or default_users
    dram = dataclasses.replace(s, **DRAM_AND_SSD)
    tiers = [("host tier / 8", dataclasses.replace(s, host_fraction=s.host_fraction / 8)),
             ("DRAM host + SSD disk", dram),
             ("DRAM host only", dataclasses.replace(dram, disk_bytes=0.0))]
    rows = sweep(s, cases(users), seed, progress)
    for name, changed in tiers:
        rows += sweep(changed, [(name, {"system": SYMPHONY, "users": users})], seed, progress)
    rows = [{k: v for k, v in row.items() if k not in ("system", "advisories")} for row in rows]
    base = rows[0]
    for row in rows:
        row["throughput_change"] = (row["throughput.output_tokens_per_s"]
                                    / base["throughput.output_tokens_per_s"] - 1)
        row["tpot_change"] = row["tpot_s.mean"] / base["tpot_s.mean"] - 1
        row["paper"] = PAPER.get(row["case"], "")
    summary = "\n".join([
        f"# SYMPHONY ablations ({users} users, {s.nodes} x {s.gpu}, {s.model})", "",
        "Changes are relative to `symphony` with every advisory, in the same run. Where K,V "
        "went (over the whole run): "
        "`redundant_fraction` of prefilled tokens recomputed history; `transfers` between "
        "nodes, the share of them complete when their request arrived, and their mean time.",
        "", table(rows, ["case", "finished", "tpot_s.mean", "ttft_s.p99",
                         "throughput.output_tokens_per_s", "throughput_change", "tpot_change",
                         "paper"]),
        "", table(rows, ["case", "redundant_fraction", "migration.transfers",
                         "migration.transfers_done_before_arrival_fraction",
                         "migration.mean_transfer_s"])])

    def plot(plt):
        figure, axes = plt.subplots(1, 2, figsize=(11, 3.5))
        labels = [r["case"] for r in rows]
        axes[0].barh(labels, [100 * r["throughput_change"] for r in rows])
        axes[0].set(xlabel="output throughput change (%)")
        axes[1].barh(labels, [1e3 * r["tpot_s.mean"] for r in rows])
        axes[1].set(xlabel="mean TPOT (ms)")
        for ax in axes:
            ax.invert_yaxis()
            ax.grid(alpha=0.3, axis="x")
        figure.tight_layout()
        return figure

    return write(out, NAME, rows, summary, plot)
