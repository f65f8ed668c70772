"""Step-time profile: engine steps measured on this machine, and the cost model fitted to them.

The simulator replaces the forward pass by a cost model of a step's time given its batch
(``symphony_jax.sim.cost_model``). This benchmark measures the engine's device work for one step
— ``device_step.schedule``, the host read of the plan's counts that picks the shape bucket, and
``device_step.run`` (model, sampling, commit) until its outputs are ready — for a spread of
batches of the ``tiny`` model: pure decode at several batch sizes and contexts, prefill chunks
of several lengths after several contexts, and decodes mixed with a chunk. Each batch is set up
directly in the scheduler's state (its requests admitted, their contexts' blocks reserved; K,V
values do not change timings), every shape bucket is compiled by warm-up steps before any is
timed, and the batches are timed in a random order. A sample is the fastest of 3 steps of
its batch run back to back (the machine may be shared: a slower step timed another process
too); it records the plan's query lengths and each slot's cached tokens before the step. Steps
run in isolation admit nothing and report to no one: a model fitted to them has no host terms
(``admission_s`` and ``report_s`` are 0; ``Engine(record_steps=True)`` measures them).

``Calibrated`` (with the engine's limits: steps counted padded to its shape buckets) is fitted
to the samples of a random 70% of the batch compositions and judged on the samples of the
others (held out whole, so the check is on batches the fit never saw). A
roofline prediction on an A100 is printed as a sanity line: a model, not a measurement.

Usage: ``python experiments/bench/step_profile.py [--quick] [--out FILE.json]`` (``--out``
writes the samples and their meta for ``cost_model.load_profile``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import _report  # beside this script
from symphony_jax.config import CacheConfig, EngineConfig, SchedulerConfig, model_preset
from symphony_jax.engine import device_step
from symphony_jax.engine.sampling import SamplingTable
from symphony_jax.memory import block_table as bt
from symphony_jax.memory import kv_cache
from symphony_jax.model.params import init_params
from symphony_jax.scheduler import admission, batch
from symphony_jax.scheduler import state as S
from symphony_jax.scheduler.policy import Policy
from symphony_jax.sim import (FEATURES, Geometry, Roofline, StepSamples, fit, gpu,
                              relative_errors, save_profile)

PRESET = "tiny"
POLICY = Policy()
HELD_OUT = 0.3  # fraction of the batch compositions the fit does not see
BEST_OF = 3  # steps per sample
Batch = tuple[tuple[int, int], ...]  # a step: (context, query) tokens of each sequence


def compositions(quick: bool) -> list[Batch]:
    """Pure decode (equal and random contexts), one or two prefill chunks, and decodes mixed
    with a chunk; sequence counts are powers of two (shape buckets are)."""
    rng = np.random.default_rng(0)
    if quick:
        sizes, contexts, chunks, mixed_sizes = (1, 8), (16, 512), (32, 256), (8,)
    else:
        sizes, contexts = (1, 2, 4, 8, 16, 32), (16, 256, 1024)
        chunks, mixed_sizes = (16, 64, 128, 256, 512, 1024), (4, 8, 16)
    random_contexts = lambda n: tuple((int(c), 1) for c in rng.integers(1, 1024, n))
    decode = [((c, 1),) * b for b in sizes for c in contexts]
    decode += [random_contexts(b) for b in sizes]
    prefill = [((c, q),) for q in chunks for c in (0, 512) if c + q <= 1024]
    prefill += [((0, q // 2), (256, q // 2)) for q in chunks[1:]]
    mixed = [((int(rng.integers(0, 512)), q),) + random_contexts(b - 1)
             for b in mixed_sizes for q in chunks if 16 < q <= 512]
    return decode + prefill + mixed


def engine_config(batches: Sequence[Batch]) -> EngineConfig:
    """A node whose limits and pool hold every batch of ``batches``."""
    bs = 16
    seqs = max(len(b) for b in batches)
    tokens = max(sum(q for _, q in b) for b in batches)
    longest = max(c + q for b in batches for c, q in b)
    blocks = max(sum(math.ceil((c + q) / bs) for c, q in b) for b in batches) + 1
    return EngineConfig(model_preset(PRESET), CacheConfig(block_size=bs, num_device_blocks=blocks),
                        SchedulerConfig(max_num_seqs=seqs, max_num_batched_tokens=max(tokens, seqs),
                                        max_model_len=bs * math.ceil((longest + 1) / bs),
                                        num_slots=seqs))


def prepared(config: EngineConfig, pool: kv_cache.KVPool, tokens: jax.Array,
             step: Batch) -> device_step.DeviceState:
    """A device state whose next step is ``step``: each sequence admitted with ``context +
    query`` prompt tokens, of which ``context`` have blocks (their K,V whatever ``pool``
    holds)."""
    R, n = config.scheduler.slots, len(step)
    context = np.array([c for c, _ in step], np.int32)
    query = np.array([q for _, q in step], np.int32)
    new = S.new_requests(list(range(n)), context + query, [1] * n, size=R)
    scheduler, slots, reasons = admission.admit(S.init(config), new, limits=config.scheduler,
                                                policy=POLICY)
    if (np.asarray(reasons)[:n] != S.ADMITTED).any():
        raise RuntimeError(f"profile: batch {step} not admitted: {np.asarray(reasons)[:n]}")
    blocks, ok = bt.reserve(scheduler.blocks, slots, np.pad(context, (0, R - n)),
                            max_new_blocks=config.max_blocks_per_seq)
    if not np.asarray(ok)[:, :n].all():
        raise RuntimeError(f"profile: no blocks for the contexts of batch {step}")
    return device_step.DeviceState(dataclasses.replace(scheduler, blocks=blocks), pool, tokens,
                                   SamplingTable.create(R, 8),
                                   *device_step.empty_block_keys(config, POLICY.prefix_caching))


def timed_step(device: device_step.DeviceState, params, config: EngineConfig):
    """Run one step; returns its seconds, query lengths (i32[R]), contexts before it (i32[R])
    and the device state after it."""
    context = np.asarray(device.scheduler.cached_tokens)
    jax.block_until_ready(device)
    start = time.perf_counter()
    scheduler, plan, counts, _ = device_step.schedule(device.scheduler, 0.0,
                                                      limits=config.scheduler, policy=POLICY)
    num_seqs, num_tokens, decode, _ = np.asarray(counts)[:device_step.NUM_COUNTS].tolist()
    seqs, tokens = batch.shape(num_seqs, num_tokens, decode, config.scheduler)
    device, outputs = device_step.run(
        dataclasses.replace(device, scheduler=scheduler), params, plan, 0.0, num_seqs=seqs,
        num_tokens=tokens, decode=bool(decode), config=config, policy=POLICY, impl="auto")
    jax.block_until_ready(outputs)
    seconds = time.perf_counter() - start
    return seconds, np.asarray(plan.query_lens), context, device


def profile(config: EngineConfig, params, *, batches: Sequence[Batch], warmup: int, seed: int,
            best_of: int = 3) -> StepSamples:
    """One sample per entry of ``batches`` (repeat an entry for repeated samples), in an order
    shuffled by ``seed``, after ``warmup`` untimed steps of each distinct batch (they compile
    its shape bucket). A sample is the fastest of ``best_of`` steps of its batch run back to
    back: on a shared machine, a slower one timed another process too."""
    pool = kv_cache.create(config.model, config.cache)
    tokens = jnp.zeros((config.scheduler.slots, config.scheduler.max_model_len), jnp.int32)

    def run(step: Batch):
        nonlocal pool, tokens
        seconds, query, context, device = timed_step(prepared(config, pool, tokens, step),
                                                     params, config)
        pool, tokens = device.pool, device.tokens
        return seconds, query, context

    for step in dict.fromkeys(batches):
        for _ in range(warmup):
            run(step)
    rows = []
    for i in np.random.default_rng(seed).permutation(len(batches)):
        seconds, query, context = min((run(batches[i]) for _ in range(best_of)),
                                     key=lambda row: row[0])
        rows.append((query, context, seconds))
    query, context, seconds = zip(*rows)
    return StepSamples(np.stack(query), np.stack(context), np.asarray(seconds))


def batch_ids(samples: StepSamples) -> np.ndarray:
    """i64[N]: which distinct batch each sample ran."""
    rows = np.concatenate([samples.query_lens, samples.context_lens], axis=1)
    return np.unique(rows, axis=0, return_inverse=True)[1].reshape(-1)


def held_out_mask(samples: StepSamples, seed: int) -> np.ndarray:
    """bool[N]: the samples of a random ``HELD_OUT`` share of the distinct batches."""
    ids = batch_ids(samples)
    return (np.random.default_rng(seed).random(ids.max() + 1) < HELD_OUT)[ids]


def repeat_spread(samples: StepSamples) -> float:
    """Mean |time - its batch's median| / that median: the noise no model of the batch can
    remove."""
    ids = batch_ids(samples)
    median = np.array([np.median(samples.seconds[ids == i]) for i in range(ids.max() + 1)])[ids]
    return float(np.mean(np.abs(samples.seconds - median) / median))


def kinds(samples: StepSamples) -> np.ndarray:
    """Each sample's kind: decode (every sequence one token), prefill (none), or mixed."""
    q = samples.query_lens
    decodes, chunks = (q == 1).sum(axis=1), (q > 1).sum(axis=1)
    return np.select([chunks == 0, decodes == 0], ["decode", "prefill"], "mixed")


def error_rows(name: str, model, samples: StepSamples) -> list[str]:
    errors, kind = relative_errors(model, samples), kinds(samples)
    rows = []
    for label in ("all", "decode", "prefill", "mixed"):
        e = errors if label == "all" else errors[kind == label]
        if len(e):
            rows.append(f"| {name} | {label} | {len(e)} | {e.mean():.1%} | "
                        f"{np.percentile(e, 90):.1%} |")
    return rows


def roofline_lines() -> list[str]:
    model = Roofline(Geometry.of(model_preset("llama-3.1-8b")), gpu("A100-80GB"))
    cases = [("decode, 32 sequences of 1,024 tokens", [1] * 32, [1024] * 32),
             ("prefill chunk of 2,048 tokens", [2048], [0])]
    lines = []
    for label, q, c in cases:
        compute, memory = float(model.compute_time(q, c)), float(model.memory_time(q, c))
        lines.append(f"- {label}: {float(model.step_time(q, c)) * 1e3:,.2f} ms "
                     f"({'compute' if compute > memory else 'memory'}-bound)")
    return lines


def meta(config: EngineConfig, quick: bool, warmup: int, repeats: int, seed: int) -> dict:
    device = jax.devices()[0]
    s, c = config.scheduler, config.cache
    return {"device": f"{device.device_kind} ({device.platform})", "machine": _report.machine(),
            "jax": jax.__version__, "date": str(datetime.date.today()), "model": PRESET,
            "engine": {"block_size": c.block_size, "num_device_blocks": c.num_device_blocks,
                       "max_num_seqs": s.max_num_seqs,
                       "max_num_batched_tokens": s.max_num_batched_tokens,
                       "max_model_len": s.max_model_len, "num_slots": s.slots,
                       "impl": "auto", "policy": "default"},
            "setting": "quick" if quick else "full", "warmup": warmup, "repeats": repeats,
            "best_of": BEST_OF, "seed": seed,
            "load_average": [round(x, 2) for x in os.getloadavg()],  # 1, 5, 15 min, at the end
            "timed": "schedule + counts read + run, until the step's outputs are ready"}


def report(quick: bool, out: str | None = None) -> str:
    seed, warmup, repeats = 0, 1, (2 if quick else 3)
    distinct = compositions(quick)
    config = engine_config(distinct)
    params = init_params(config.model, jax.random.key(0))
    start = time.perf_counter()
    samples = profile(config, params, batches=[b for b in distinct for _ in range(repeats)],
                      warmup=warmup, seed=seed, best_of=BEST_OF)
    elapsed = time.perf_counter() - start
    if out:
        save_profile(out, samples, meta(config, quick, warmup, repeats, seed))
    test = held_out_mask(samples, seed)
    geometry = Geometry.of(config.model)
    model = fit(samples.take(~test), geometry, config.scheduler)
    unpadded = fit(samples.take(~test), geometry)
    device = jax.devices()[0]
    lines = [f"{device.device_kind} ({device.platform}), {_report.machine()}, JAX "
             f"{jax.__version__}, {datetime.date.today()}. {len(samples)} steps of the {PRESET} "
             f"model ({len(distinct)} batches x {repeats}, "
             f"{'quick' if quick else 'full'} setting), "
             f"measured in {elapsed:.0f} s.", "",
             "Calibrated coefficients (fitted on the training batches, steps counted padded to "
             "the engine's shape buckets):", "",
             "| feature | coefficient | as a rate |", "|---|---|---|"]
    rates = {"step": lambda v: f"{v * 1e3:.3f} ms per step",
             "linear_flop": lambda v: f"{1 / v / 1e9:.2f} GFLOP/s" if v else "free",
             "sequence": lambda v: f"{v * 1e6:.1f} us per sequence",
             "attention_flop": lambda v: f"{1 / v / 1e9:.2f} GFLOP/s" if v else "free",
             "kv_byte": lambda v: f"{1 / v / 1e9:.2f} GB/s" if v else "free"}
    lines += [f"| {name} | {v:.3e} | {rates[name](v)} |"
              for name, v in zip(FEATURES, model.coefficients)]
    lines += ["", f"Fit error (mean absolute relative, training samples): {model.fit_error:.1%}. "
              f"Repeats of a batch differ from their median by {repeat_spread(samples):.1%} "
              "on average (measurement noise).",
              "", "| set | kind | samples | mean rel. error | p90 rel. error |",
              "|---|---|---|---|---|"]
    lines += error_rows("train", model, samples.take(~test))
    lines += error_rows("held out", model, samples.take(test))
    lines += ["", "Counted as scheduled, not padded (`fit` without limits): held-out mean "
              f"relative error {relative_errors(unpadded, samples.take(test)).mean():.1%}."]
    lines += ["", "Roofline model (not a measurement): llama-3.1-8b, bfloat16, A100-80GB "
              "data-sheet peaks x default efficiencies:", *roofline_lines()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer batches and repeats")
    parser.add_argument("--out", help="also write the samples to this JSON profile")
    args = parser.parse_args(argv)
    text = report(args.quick, args.out)
    print(text)
    return text


if __name__ == "__main__":
    main()
