"""Engine benchmark: decode throughput of the whole engine against a naive generation loop.

The engine step is everything a serving step does — schedule (jitted), lay out the batch, run the
paged model, sample, commit — with the host reading back the plan's size and the sampled tokens.
The naive loop is ``model.dense`` over a contiguous cache and ``argmax``: no scheduler, no pages.
Both run the same model on the same batches of prompts (random weights: timings do not depend on
values), generating until every sequence has its tokens; the figure is decode tokens per second
over the steps where every sequence decodes, the two measured alternately in the same run, three
rounds each (each after a warm-up round that compiles it).

On CPU: the ``tiny`` model and the SmolLM2-135M geometry (float32) at batch 1, 8 and 32. On a GPU:
the Llama-3.1-8B geometry in bfloat16 at batch 1, 16 and 64, with the decode step's fraction of
its roofline bound (weights and KV read once per step at peak HBM bandwidth).

Usage: ``python experiments/bench/engine.py [--quick] [--out FILE.md]``.
"""

from __future__ import annotations

import dataclasses
import datetime
import time

import jax
import jax.numpy as jnp
import numpy as np

import _report  # beside this script
from symphony_jax.config import CacheConfig, EngineConfig, SchedulerConfig, model_preset
from symphony_jax.engine.engine import Engine
from symphony_jax.engine.sampling import SamplingParams
from symphony_jax.model import dense
from symphony_jax.model.params import init_params

ON_GPU = jax.default_backend() == "gpu"
ROUNDS = 3  # the two loops alternate; each figure is the median of its rounds
PEAK_BANDWIDTH = {"NVIDIA H100 PCIe": 2.0e12, "NVIDIA H100": 3.35e12, "NVIDIA H200": 4.8e12,
                  "NVIDIA A100": 2.04e12}


def engine_decode(config: EngineConfig, params, prompts: np.ndarray, steps: int) -> float:
    """Seconds per engine step while every sequence decodes (after a warm-up round)."""
    engine = Engine(config, params)
    for _ in range(2):  # the first round compiles every bucket it meets
        for prompt in prompts:
            engine.add_request(prompt.tolist(), SamplingParams(max_tokens=steps))
        times = []
        while engine.has_unfinished():
            start = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - start)
    # Steps 0-1 prefill and dispatch the first decode; the last one only collects.
    return float(np.median(times[2:-1]))


def naive_decode(config: EngineConfig, params, prompts: np.ndarray, steps: int) -> float:
    """Seconds per step of a contiguous-cache greedy loop, waited for each step."""
    model = config.model
    times = []
    for _ in range(2):
        cache = dense.init_cache(model, len(prompts), prompts.shape[1] + steps)
        logits, cache = dense.forward(params, cache, jnp.asarray(prompts), config=model)
        token = jnp.argmax(logits[:, -1], axis=-1)[:, None].astype(jnp.int32)
        times = []
        for _ in range(steps - 1):
            start = time.perf_counter()
            logits, cache = dense.forward(params, cache, token, config=model)
            token = jnp.argmax(logits[:, -1], axis=-1)[:, None].astype(jnp.int32)
            token.block_until_ready()
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def report(quick: bool) -> str:
    device = jax.devices()[0]
    if ON_GPU:
        cases = [("llama-3.1-8b", model_preset("llama-3.1-8b"), (1, 16, 64), 512, 32)]
    elif quick:
        cases = [("tiny", model_preset("tiny"), (1, 4), 16, 6)]
    else:
        smol = dataclasses.replace(model_preset("smollm2-135m"), dtype="float32")
        cases = [("tiny", model_preset("tiny"), (1, 8, 32), 64, 32),
                 ("smollm2-135m", smol, (1, 8, 32), 64, 16)]
    peak = next((v for k, v in PEAK_BANDWIDTH.items() if device.device_kind.startswith(k)), None)
    lines = [f"{device.device_kind} ({device.platform}), JAX {jax.__version__}, "
             f"{datetime.date.today()}. Greedy decoding of prompts of P tokens, median step "
             "while every sequence decodes.", "",
             "| model | batch | P | engine step | engine tokens/s | naive step | naive tokens/s | "
             "engine / naive | of roofline |", "|---|---|---|---|---|---|---|---|---|"]
    for name, model, batches, prompt_len, steps in cases:
        params = init_params(model, jax.random.key(0))
        weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
        for batch in batches:
            max_len = -(-(prompt_len + steps) // 16) * 16
            blocks = batch * max_len // 16 + 1
            config = EngineConfig(model, CacheConfig(block_size=16, num_device_blocks=blocks),
                                  SchedulerConfig(max_num_seqs=batch,
                                                  max_num_batched_tokens=max(batch * prompt_len,
                                                                             16),
                                                  max_model_len=max_len, num_slots=batch))
            prompts = np.random.default_rng(batch).integers(
                0, model.vocab_size, (batch, prompt_len)).astype(np.int32)
            rounds = [(engine_decode(config, params, prompts, steps),
                       naive_decode(config, params, prompts, steps)) for _ in range(ROUNDS)]
            ours, naive = np.median(rounds, axis=0)
            kv = batch * (prompt_len + steps // 2) * model.kv_bytes_per_token()
            roofline = (f"{(weight_bytes + kv) / peak / ours:.0%}" if peak else "n/a")
            lines.append(f"| {name} | {batch} | {prompt_len} | {ours * 1e3:,.2f} ms | "
                         f"{batch / ours:,.1f} | {naive * 1e3:,.2f} ms | {batch / naive:,.1f} | "
                         f"{naive / ours:.2f}x | {roofline} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    return _report.main(__file__, __doc__, report, argv)


if __name__ == "__main__":
    main()
