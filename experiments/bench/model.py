"""Model benchmark: prefill and decode throughput of the paged forward, and compile time.

On CPU: SmolLM2-135M geometry (float32, random weights: timings do not depend on values) at
batch 1 and 32 — prefill tokens/s for prompts of 64 tokens, decode tokens/s over 16 steps — and
the compile time of the ``tiny`` model's forward. On a GPU: Llama-3.1-8B geometry in bfloat16
at batch 1, 16 and 64 with 1024 tokens of context: decode time per step against its roofline
bound (weight bytes + KV bytes read, over the peak HBM bandwidth), as a fraction.

Each step's block-table update and layout are prepared before the step is timed: the figures
are the model's forward alone.

Usage: ``python experiments/bench/model.py [--quick] [--out FILE.md]``.
"""

from __future__ import annotations

import dataclasses
import datetime
import time

import jax
import jax.numpy as jnp
import numpy as np

import _report  # beside this script
from symphony_jax.config import CacheConfig, ModelConfig, model_preset
from symphony_jax.memory import block_table as bt
from symphony_jax.memory import kv_cache, layout
from symphony_jax.model import llama
from symphony_jax.model.params import init_params, num_params

ON_GPU = jax.default_backend() == "gpu"
PEAK_BANDWIDTH = {"NVIDIA H100 PCIe": 2.0e12, "NVIDIA H100": 3.35e12, "NVIDIA H200": 4.8e12,
                  "NVIDIA A100": 2.04e12}
BLOCK = 16


@dataclasses.dataclass
class Batch:
    """``batch`` sequences on one table and pool, stepped through the paged forward."""

    config: ModelConfig
    params: object
    batch: int
    max_len: int

    def __post_init__(self):
        blocks = self.batch * -(-self.max_len // BLOCK) + 1
        self.table = bt.create(self.batch, blocks, -(-self.max_len // BLOCK), BLOCK)
        self.pool = kv_cache.create(self.config, CacheConfig(block_size=BLOCK,
                                                             num_device_blocks=blocks))
        self.groups = (0,) * self.config.num_layers
        self.rng = np.random.default_rng(0)

    def prepare(self, tokens_each: int):
        """Reserve ``tokens_each`` tokens for every sequence; the step's inputs."""
        slots = jnp.arange(self.batch, dtype=jnp.int32)
        lens = jnp.full(self.batch, tokens_each, jnp.int32)
        self.table, _ = bt.reserve(self.table, slots, lens)
        total = self.batch * tokens_each
        ids = jnp.asarray(self.rng.integers(0, self.config.vocab_size, total), jnp.int32)
        return ids, layout.build(self.table, slots, lens, num_tokens=total)

    def run(self, ids, step_layout, decode: bool) -> float:
        """Seconds of one forward, waited for."""
        start = time.perf_counter()
        out, self.pool = llama.forward(self.params, self.pool, ids, step_layout,
                                       config=self.config, layer_groups=self.groups,
                                       decode=decode)
        out.block_until_ready()
        return time.perf_counter() - start


def throughput(config: ModelConfig, params, batch: int, prompt: int, steps: int) -> dict:
    """Prefill and decode of ``batch`` sequences (the first of each compiles, untimed)."""
    run = Batch(config, params, batch, prompt * 2 + steps + 1)
    run.run(*run.prepare(prompt), decode=False)  # compile
    prefill = run.run(*run.prepare(prompt), decode=False)
    run.run(*run.prepare(1), decode=True)  # compile
    decode = [run.run(*run.prepare(1), decode=True) for _ in range(steps)]
    context = 2 * prompt + 1 + steps // 2
    return dict(prefill=prefill, decode=float(np.median(decode)), context=context,
                prefill_tokens=batch * prompt)


def compile_seconds(config: ModelConfig) -> float:
    run = Batch(config, init_params(config, jax.random.key(0)), 4, 64)
    ids, step_layout = run.prepare(8)
    lowered = llama.forward.lower(run.params, run.pool, ids, step_layout, config=config,
                                  layer_groups=run.groups)
    start = time.perf_counter()
    lowered.compile()
    return time.perf_counter() - start


def report(quick: bool) -> str:
    device = jax.devices()[0]
    if ON_GPU:
        name, config = "llama-3.1-8b", model_preset("llama-3.1-8b")
        batches, prompt, steps = (1, 16, 64), 512, 16
    else:
        name, config = ("tiny", model_preset("tiny")) if quick else (
            "smollm2-135m", dataclasses.replace(model_preset("smollm2-135m"), dtype="float32"))
        batches, prompt, steps = ((1, 4), 16, 4) if quick else ((1, 32), 64, 16)
    params = init_params(config, jax.random.key(0))
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    peak = next((v for k, v in PEAK_BANDWIDTH.items() if device.device_kind.startswith(k)), None)
    lines = [f"{device.device_kind} ({device.platform}), JAX {jax.__version__}, "
             f"{datetime.date.today()}. {name} geometry, {config.dtype}, random weights "
             f"({num_params(params) / 1e6:,.1f} M parameters); blocks of {BLOCK}. Tiny model "
             f"forward compiles in {compile_seconds(model_preset('tiny')):.2f} s.", "",
             "| batch | prefill tokens/s | decode step | decode tokens/s | roofline step | "
             "of roofline |", "|---|---|---|---|---|---|"]
    for batch in batches:
        r = throughput(config, params, batch, prompt, steps)
        kv_read = batch * r["context"] * config.kv_bytes_per_token()
        bound = (weight_bytes + kv_read) / peak if peak else None
        lines.append(
            f"| {batch} | {r['prefill_tokens'] / r['prefill']:,.0f} | {r['decode'] * 1e3:,.2f} ms"
            f" | {batch / r['decode']:,.1f} | "
            + (f"{bound * 1e3:,.2f} ms | {bound / r['decode']:.0%} |" if bound else "n/a | n/a |"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    return _report.main(__file__, __doc__, report, argv)


if __name__ == "__main__":
    main()
