"""Real-engine check: the main comparison at small scale on the real cluster (fake CPU devices,
the ``tiny`` model) next to the simulator on the same workload.

The real cluster serves a closed-loop chat schedule in real time; the simulator — the same
scheduler and placement, a cost model instead of the model — serves the same schedule. Its cost
model is ``Calibrated``, fitted to the steps the real engines of the same case (system and nodes)
recorded (``Engine(record_steps=True)``: each step's batch, the time to the next step and the
admissions before it, with the engine's padding of batches to shape buckets, and when its
tokens were read) in as many timed runs as the comparison has, on another schedule of the same
workload (another seed), so the comparison is on requests the fit never saw. The same runs'
migrations give the simulator's ``migration_latency_s`` (``migration_latency``). Every real run is
preceded by an untimed one of the same schedule, after which every node compiles the steps any
node ran; the timed run's clock leaves out what still compiles (``replay.timed_replays``). Needs
as many JAX devices as nodes (``--xla_force_host_platform_device_count``).
"""

from __future__ import annotations

import jax
import numpy as np

from symphony_jax import metrics
from symphony_jax.cluster.cluster import Cluster, ClusterConfig
from symphony_jax.cluster.replay import timed_replays
from symphony_jax.config import CacheConfig, EngineConfig, SchedulerConfig, model_preset
from symphony_jax.figures.common import Figure, table, write
from symphony_jax.model.params import init_params
from symphony_jax.progress import bar as progress_bar
from symphony_jax.sim import Geometry, StepSamples, fit
from symphony_jax.sim.simulator import SimConfig, simulate
from symphony_jax.workloads import ShareGPTLike, ThinkTime, closed_loop, sharegpt_like

NAME = "real_check"
CONFIG = EngineConfig(model_preset("tiny"), CacheConfig(block_size=16, num_device_blocks=49),
                      SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256,
                                      max_model_len=512, num_slots=32))
CHAT = ShareGPTLike(mean_input_tokens=48, mean_output_tokens=32, max_context_tokens=448)
THINK = ThinkTime(reading_wpm=7_200, typing_wpm=5_400)  # about 20x a person's
LINK_BANDWIDTH = 5e9  # B/s: copies between fake CPU devices are memory copies
METRICS = (("TTFT", metrics.ttft_s), ("TPOT", metrics.tpot_s), ("e2e", metrics.e2e_latency_s))
COLUMNS = ("nodes", "system", "metric", "real_s", "real_spread", "simulated_s", "error")
REPEATS = 3  # timed real runs of each case: on shared CPU cores their times vary


def schedule_of(seed: int, quick: bool, scale: tuple[int, int] | None = None):
    """The closed-loop chat schedule of ``seed``; ``scale``: (sessions, users), by default
    (8, 4) with ``quick``, else (24, 8)."""
    sessions, users = scale or ((8, 4) if quick else (24, 8))
    return closed_loop(sharegpt_like(sessions, CHAT, seed=seed), users, think=THINK,
                       stagger_s=1.0, seed=seed)


def timed(schedule, system: str, nodes: int, params, record: bool = False, repeats: int = 1):
    """``replay.timed_replays`` of ``schedule`` on the real cluster: each timed run's records
    and, with ``record``, its engines' step logs; and the compilations (count, seconds) the
    clock left out."""
    devices = jax.devices()
    if len(devices) < nodes:
        raise ValueError(f"real_check: {nodes} nodes need {nodes} JAX devices, found "
                         f"{len(devices)} (set XLA_FLAGS=--xla_force_host_platform_device_count"
                         f"={nodes} before JAX starts)")
    config = ClusterConfig(CONFIG, num_nodes=nodes, devices=tuple(devices[:nodes]))
    runs, compiled = timed_replays(
        schedule, lambda clock: Cluster(config, system, params, clock=clock,
                                        record_steps=record), repeats=repeats)
    return [(records, [n.engine.step_log for n in cluster.nodes] if record else [])
            for records, cluster in runs], compiled


def samples_of(logs) -> StepSamples:
    """Each step of the engines' ``step_log``s that computed something, timed to its engine's
    next step (the admissions just before it included), and the lag from then until the
    step's outputs were read."""
    rows = [(a.query_lens, a.context_lens, b.time_s - a.time_s, b.admitted,
             a.reported_s - b.time_s)
            for log in logs for a, b in zip(log, log[1:]) if a.query_lens.any()]
    q, c, seconds, admitted, lags = zip(*rows)
    return StepSamples(np.stack(q), np.stack(c), np.asarray(seconds), np.asarray(admitted),
                       np.asarray(lags))


def migration_latency(transfers) -> float:
    """The median time of the completed migrations among ``transfers`` (``TransferRecords``
    of several runs) beyond their bytes' time at ``LINK_BANDWIDTH``: dispatching the copy and
    the controller noticing its end (0: none completed)."""
    extra = np.concatenate([np.zeros(0)] + [
        (t.end_s - t.start_s - t.bytes / LINK_BANDWIDTH)[np.isfinite(t.end_s)]
        for t in transfers])
    return max(float(np.median(extra)), 0.0) if len(extra) else 0.0


def stats(records) -> dict[str, float]:
    """Mean and p90 of each of ``METRICS`` over finished requests."""
    out = {}
    for name, fn in METRICS:
        d = metrics.distribution(fn(records.requests))
        out[f"{name} mean"], out[f"{name} p90"] = d["mean"], d["p90"]
    return out


def compare(quick: bool, nodes=(1, 2), systems=("recompute", "symphony"),
            progress: bool = False, seed: int = 0, scale: tuple[int, int] | None = None,
            repeats: int = REPEATS) -> tuple[list[dict], list[str]]:
    """Rows (nodes, system, metric, real: mean over ``repeats`` runs and their spread
    (max - min) / mean, simulated, error against the real mean), and a line per case (its
    fitted model and real runs). The schedules: ``schedule_of(seed + 1)`` to calibrate on (the
    steps of ``repeats`` runs), ``schedule_of(seed)`` to compare on."""
    params = init_params(CONFIG.model, jax.random.key(seed))
    calibration, evaluation = schedule_of(seed + 1, quick, scale), schedule_of(seed, quick, scale)
    rows, notes = [], []
    bar = progress_bar(len(nodes) * len(systems), progress, unit="case")
    for n in nodes:
        for system in systems:
            calibration_runs, _ = timed(calibration, system, n, params, record=True,
                                        repeats=repeats)
            samples = samples_of([log for _, logs in calibration_runs for log in logs])
            cost = fit(samples, Geometry.of(CONFIG.model), limits=CONFIG.scheduler)
            latency = migration_latency([records.transfers for records, _ in calibration_runs])
            sim_config = SimConfig(CONFIG, n, LINK_BANDWIDTH, LINK_BANDWIDTH,
                                   migration_latency_s=latency)
            runs, (compiles, seconds) = timed(evaluation, system, n, params, repeats=repeats)
            notes.append(
                f"{n} node(s), {system}: fitted to {len(samples)} steps (mean relative error "
                f"{cost.fit_error:.1%}; {1e3 * cost.admission_s:.2f} ms per admission, "
                f"{1e3 * cost.report_s:.2f} ms report lag, {1e3 * latency:.2f} ms per "
                f"migration beyond its bytes); {repeats} real runs, whose clock "
                f"left out {compiles} compilations ({seconds:.1f} s)")
            real = [stats(records) for records, _ in runs]
            sim = stats(simulate(evaluation, system, sim_config, cost))
            for key in sim:
                values = np.array([r[key] for r in real])
                mean = float(values.mean())
                rows.append({"nodes": n, "system": system, "metric": key, "real_s": mean,
                             "real_spread": float(np.ptp(values)) / mean,
                             "simulated_s": sim[key], "error": sim[key] / mean - 1})
            # Each compiled CPU executable holds hundreds of memory maps: the cases' steps
            # together would pass the kernel's limit per process (65,530 by default).
            jax.clear_caches()
            bar.update(1)
    bar.close()
    return rows, notes


def run(out, *, quick: bool = False, seed: int = 0, progress: bool = False, nodes=(1, 2),
        **options) -> Figure:
    """``options``: ``compare``'s (systems, scale, repeats)."""
    rows, notes = compare(quick, nodes, progress=progress, seed=seed, **options)
    summary = "\n".join([
        "# Real cluster and simulator on the same workload (tiny model, fake CPU devices)", "",
        *notes, "", table(rows, COLUMNS)])

    def plot(plt):
        means = [r for r in rows if r["metric"].endswith("mean")]
        figure, axes = plt.subplots(figsize=(8, 3.5))
        x = np.arange(len(means))
        axes.bar(x - 0.2, [1e3 * r["real_s"] for r in means], 0.4, label="real")
        axes.bar(x + 0.2, [1e3 * r["simulated_s"] for r in means], 0.4, label="simulated")
        axes.set_xticks(x, [f"{r['nodes']}n {r['system']}\n{r['metric']}" for r in means],
                        fontsize=6)
        axes.set(ylabel="ms", yscale="log")
        axes.legend()
        figure.tight_layout()
        return figure

    return write(out, NAME, rows, summary, plot)
