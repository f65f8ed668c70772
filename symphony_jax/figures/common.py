"""What the figures share: the simulated setting, workloads, sweeps and the files they write.

Every figure is a function ``run(out, *, quick, seed, progress) -> Figure``: it simulates (or,
for the real-engine check, serves) a small config, writes ``<name>.csv``, ``<name>.png`` and
``<name>.md`` into ``out``, and returns what it wrote. ``quick`` is the reduced scale that
``symphony-jax reproduce --quick`` runs on two CPU cores in minutes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from symphony_jax import metrics
from symphony_jax.cluster.records import ClusterRecords
from symphony_jax.cluster.systems import System
from symphony_jax.config import SchedulerConfig, model_preset
from symphony_jax.progress import bar as progress_bar
from symphony_jax.sim import Geometry, Roofline, gpu
from symphony_jax.sim.simulator import SimConfig, simulate
from symphony_jax.workloads import (LONG_CHAT, AdvisoryConfig, Schedule, ShareGPTLike,
                                    ThinkTime, closed_loop, sharegpt_like)
from symphony_jax.workloads import traces
from symphony_jax.workloads.sharegpt_synth import truncate_to_context

WORKLOADS = ("sharegpt", "long_chat", "mooncake", "ragpulse")
# Synthetic chats: ShareGPT-like, and the same opening with a long document (``LONG_CHAT``).
CHATS = {"sharegpt": ShareGPTLike(), "long_chat": LONG_CHAT}
# Long prompts carry documents and retrieved context: typing one at 40 words a minute would take
# over 20 minutes (Mooncake's median prompt), so on the workloads that have them a user types for
# at most this long (a person's time; ``think_speedup`` divides it) and pastes the rest.
TRACE_TYPING_S = 30.0
TRACE_FILES = {"mooncake": "mooncake/conversation_trace_sessions_reconstructed.csv",
               "ragpulse": "ragpulse/0_trace.jsonl"}
# A request meets the SLO when its TTFT and TPOT are within these; a load point meets it
# when SLO_ATTAINMENT of its requests do.
SLO = metrics.SLO(ttft_s=2.0, tpot_s=0.1)
SLO_ATTAINMENT = 0.9
# The paper's DRAM and SSD per GPU (a quarter of each node's), the SSD read and written at a
# quarter of a PCIe 4.0 NVMe drive's ~7-8 GB/s: ``Study`` fields.
DRAM_AND_SSD = {"host_bytes": 64e9, "disk_bytes": 1e12, "disk_bandwidth": 2e9}


@dataclasses.dataclass(frozen=True)
class Study:
    """A simulated cluster and chat workload (the paper's: 2 nodes x 4 A100-80GB, one node of
    the simulator per GPU, Llama-3.1-8B, ShareGPT-like users reading and typing)."""

    model: str = "llama-3.1-8b"
    gpu: str = "A100-80GB"
    nodes: int = 8
    seconds: float = 600.0  # simulated
    warmup_s: float = 120.0  # requests arriving before are left out of the metrics,
    drain_s: float = 60.0  # and those arriving in the last drain_s (they may not finish)
    # Users read and type at these speeds (words a minute), times ``think_speedup``. The
    # advisory is sent when typing starts, so typing sets its lead: 40 wpm gives ShareGPT-like
    # prompts a mean lead of 106 s; the paper measured 11.3 s, which ``ThinkTime``'s calibrated
    # 376 wpm gives.
    reading_wpm: float = 250.0
    typing_wpm: float = 40.0
    think_speedup: float = 1.0
    workload: str = "sharegpt"
    # The synthetic chat's shape, instead of the workload's (``CHATS``; e.g. longer sessions).
    chat: ShareGPTLike | None = None
    data_dir: str = "experiments/data"
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 8192
    # Sessions a node can keep K,V for (running, waiting and idle), per node: enough that
    # memory, not the table, bounds what it keeps (4 x max_num_seqs, the scheduler's default).
    num_slots: int = 1024
    # A node's host tier (systems that keep K,V on the host): ``host_fraction`` times the
    # device pool, or ``host_bytes``. By default it stands for DRAM and SSD as one tier (no
    # disk tier); ``DRAM_AND_SSD`` makes them the paper's two (256 GB of DRAM and 4 TB of SSD
    # per 4 A100s), the SSD a disk tier of systems with ``disk_tier`` (SYMPHONY's tiered
    # storage; InferCept-style offloading keeps to DRAM).
    host_fraction: float = 8.0
    host_bytes: float | None = None
    disk_bytes: float = 0.0
    disk_bandwidth: float = 2e9

    def __post_init__(self):
        model_preset(self.model), gpu(self.gpu)  # clear errors for unknown names
        if self.workload not in WORKLOADS:
            raise ValueError(f"unknown workload {self.workload!r}: expected one of "
                             f"{', '.join(WORKLOADS)}")
        if self.chat is not None and (self.workload not in CHATS or
                                      not isinstance(self.chat, ShareGPTLike)):
            raise ValueError(f"Study.chat={self.chat!r}: expected None, or a ShareGPTLike with "
                             f"a synthetic workload ({', '.join(CHATS)}), not {self.workload!r}")

    @property
    def config(self) -> SimConfig:
        scheduler = SchedulerConfig(max_num_seqs=self.max_num_seqs,
                                    max_num_batched_tokens=self.max_num_batched_tokens,
                                    max_model_len=self.max_model_len, num_slots=self.num_slots)
        return SimConfig.for_gpu(model_preset(self.model), gpu(self.gpu), scheduler,
                                 num_nodes=self.nodes, host_fraction=self.host_fraction,
                                 host_bytes=self.host_bytes,
                                 disk_bytes=self.disk_bytes, disk_bandwidth=self.disk_bandwidth)

    @property
    def cost(self) -> Roofline:
        return Roofline(Geometry.of(model_preset(self.model)), gpu(self.gpu))

    @property
    def window(self) -> tuple[float, float]:
        """Arrival times of the requests the metrics cover."""
        return (self.warmup_s, max(self.seconds - self.drain_s, self.warmup_s))

    @functools.lru_cache(maxsize=4)
    def schedule(self, users: int, seed: int,
                 advisories: AdvisoryConfig = AdvisoryConfig()) -> Schedule:
        """``users`` closed-loop users on this study's workload (enough sessions to last);
        kept for the next systems of a sweep (traces are read once)."""
        limit = self.max_model_len - 1024  # room for the last answer
        typing_s = math.inf if self.workload == "sharegpt" else TRACE_TYPING_S
        think = ThinkTime(reading_wpm=self.reading_wpm * self.think_speedup,
                          typing_wpm=self.typing_wpm * self.think_speedup,
                          max_typing_s=typing_s / self.think_speedup)
        if self.workload in CHATS:
            chat = dataclasses.replace(self.chat or CHATS[self.workload],
                                       max_context_tokens=limit)
            work = sharegpt_like(users * 8, chat, seed=seed)
        else:
            path = os.path.join(self.data_dir, TRACE_FILES[self.workload])
            loader = (traces.load_mooncake_sessions if self.workload == "mooncake"
                      else traces.load_ragpulse)
            work = truncate_to_context(traces.to_workload(loader(path)), limit)
        return closed_loop(work, users, think=think, advisories=advisories,
                           stagger_s=min(60.0, self.seconds / 4), seed=seed)

    def simulate(self, system: str | System, users: int, seed: int,
                 advisories: AdvisoryConfig = AdvisoryConfig()) -> ClusterRecords:
        return simulate(self.schedule(users, seed, advisories), system, self.config, self.cost,
                        until_s=self.seconds)

    def check_window(self, records: ClusterRecords) -> None:
        """Raise if no request arrived in the measured window (its metrics would all be NaN)."""
        arrivals, (lo, hi) = records.requests.arrival_s, self.window
        if not np.any((arrivals >= lo) & (arrivals <= hi)):
            raise ValueError(
                f"Study: no request ({self.workload}) arrived in the measured window "
                f"[{lo:g}, {hi:g}] s of {self.seconds:g} simulated s: raise `seconds` or "
                "`think_speedup`")


def point(study: Study, records: ClusterRecords) -> dict[str, float]:
    """The latency and throughput of one run, over requests arriving in the study's window."""
    study.check_window(records)
    s = metrics.summarize(records.requests, steps=records.steps, transfers=records.transfers,
                          slo=SLO, window=study.window, bin_s=1.0)
    keys = ("requests", "finished", "normalized_latency_s.mean", "tpot_s.mean", "ttft_s.p50",
            "ttft_s.p99", "throughput.requests_per_s", "throughput.output_tokens_per_s",
            "slo_attainment", "redundant_fraction", "load_imbalance.mean",
            "migration.transfers", "migration.transfers_done_before_arrival_fraction",
            "migration.mean_transfer_s")
    return {k: s.get(k, math.nan) for k in keys}


def sweep(study: Study, cases: Sequence[tuple[str, dict]], seed: int,
          progress: bool) -> list[dict]:
    """Simulate each case (a label and ``Study.simulate`` arguments); one row per case."""
    bar = progress_bar(len(cases), progress, unit="run")
    rows = []
    for label, kwargs in cases:
        rows.append({"case": label, **kwargs, **point(study, study.simulate(seed=seed,
                                                                            **kwargs))})
        bar.update(1)
    bar.close()
    return rows


@dataclasses.dataclass(frozen=True)
class Figure:
    name: str
    files: tuple[pathlib.Path, ...]
    summary: str  # markdown


def write(out: str | os.PathLike, name: str, rows: Sequence[Mapping[str, object]],
          summary: str, plot) -> Figure:
    """``<name>.csv`` (``rows``), ``<name>.png`` (``plot(axes)`` on a matplotlib figure) and
    ``<name>.md`` (``summary``) in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    columns = {key: np.asarray([row[key] for row in rows]) for key in rows[0]}
    metrics.write_table(out / f"{name}.csv", columns)
    figure = plot(plt)
    figure.savefig(out / f"{name}.png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    (out / f"{name}.md").write_text(summary + "\n")
    return Figure(name, (out / f"{name}.csv", out / f"{name}.png", out / f"{name}.md"), summary)


def table(rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> str:
    """A markdown table of ``columns`` of ``rows`` (floats to 3 significant digits)."""
    fmt = lambda v: f"{v:.3g}" if isinstance(v, (float, np.floating)) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
