"""Transfer benchmark: K,V blocks offloaded to pinned host memory and restored, against raw copies.

- Offload: ``transfer.offload`` of a slot's N blocks (scattered pool blocks, gathered in one
  jitted call whose output lives in ``pinned_host`` memory), waited for, against
  ``jax.device_put`` of one contiguous device array of the same bytes to ``pinned_host``.
- Restore: ``transfer.to_device`` of those chunks and ``transfer.scatter`` into the (donated)
  pool, waited for, against ``jax.device_put`` of one contiguous ``pinned_host`` array of the
  same bytes to device memory.

For N in 1, 4, ..., 1024 blocks, each as one chunk (``largest`` = 1024). The copies of a size
run in turn, repeatedly (machine noise hits all alike); each figure is the fastest repetition.
Every copy writes a freshly allocated output, ours and the raw one alike. On CPU that makes copies
of tens of MiB or more page-fault bound: the same raw copy runs anywhere between 1 and 15 GiB/s
from one repetition to the next, as the allocator happens to reuse memory or not, so medians
there measure the allocator; the fastest repetition comes closest to the copy itself. A second
table times the restore's two parts alone: ``to_device`` (into fresh device buffers) and
``scatter`` (of chunks already on the device, into the donated pool).

On CPU: the SmolLM2-135M geometry in float32 (a block of 16 tokens is 720 KiB of K and V), a
pool of 1,100 blocks (0.77 GiB). On a GPU: the Llama-3.1-8B geometry in bfloat16 (2 MiB per
block). Target: ours / raw >= 0.8 at >= 64 blocks.

Usage: ``python experiments/bench/transfer.py [--quick] [--out FILE.md]``.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import _report  # beside this script
from symphony_jax.config import ModelConfig, model_preset
from symphony_jax.memory import transfer
from symphony_jax.memory.kv_cache import KVPool

ON_GPU = jax.default_backend() == "gpu"
BLOCK_SIZE = 16
SIZES = (1, 4, 16, 64, 256, 1024)
TARGET = 0.8  # ours / raw at >= 64 blocks


@dataclasses.dataclass(frozen=True)
class Setup:
    model: ModelConfig
    sizes: tuple[int, ...]
    pool_blocks: int
    repeats: int

    @property
    def block_bytes(self) -> int:
        """Bytes of K and V of one block, all layers."""
        return self.model.kv_bytes_per_token() * BLOCK_SIZE

    @property
    def largest(self) -> int:
        return max(self.sizes)


def setup(quick: bool) -> Setup:
    if ON_GPU:
        return Setup(model_preset("llama-3.1-8b"), SIZES, 1100, 3 if quick else 9)
    smol = dataclasses.replace(model_preset("smollm2-135m"), dtype="float32")
    if quick:
        return Setup(smol, (1, 16, 64), 80, 3)
    return Setup(smol, SIZES, 1100, 9)


def random_pool(s: Setup, device) -> KVPool:
    m = s.model
    shape = (m.num_layers, m.num_kv_heads, s.pool_blocks, BLOCK_SIZE, m.head_dim)
    k1, k2 = jax.random.split(jax.random.key(0))
    page = jax.jit(lambda key: jax.random.normal(key, shape, m.dtype),
                   out_shardings=transfer.device_sharding(device))
    return KVPool(page(k1), page(k2))


def slot_block_ids(s: Setup, device) -> jax.Array:
    """i32[1, 1, largest]: one slot whose blocks are scattered over the pool."""
    ids = np.random.default_rng(0).permutation(np.arange(1, s.pool_blocks))[: s.largest]
    return jax.device_put(ids.astype(np.int32)[None, None], device)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def bench_size(s: Setup, n: int, pool: KVPool, block_ids, device) -> tuple[dict, KVPool]:
    """The fastest seconds of each copy of ``n`` blocks (and of the restore's two parts), and the
    pool (donated on)."""
    layer_groups = (0,) * s.model.num_layers
    raw_shape = (n * s.block_bytes // s.model.jnp_dtype.itemsize,)
    raw_device = jax.device_put(jnp.zeros(raw_shape, s.model.dtype), device)
    raw_host = jax.device_put(raw_device, transfer.host_sharding(device))
    host_chunks = transfer.offload(pool, block_ids, 0, 0, n, layer_groups=layer_groups,
                                   largest=s.largest).wait()
    device_chunks = transfer.to_device(host_chunks, device).wait()
    state = {"pool": pool}

    def scatter(chunks):
        for c in chunks:
            state["pool"] = transfer.write(state["pool"], c, block_ids, 0)
        return state["pool"]

    copies = {
        "offload": lambda: transfer.offload(state["pool"], block_ids, 0, 0, n,
                                            layer_groups=layer_groups, largest=s.largest).wait(),
        "raw offload": lambda: jax.device_put(raw_device, transfer.host_sharding(device)),
        "restore": lambda: scatter(transfer.to_device(host_chunks, device).chunks),
        "raw restore": lambda: jax.device_put(raw_host, transfer.device_sharding(device)),
        "to_device": lambda: transfer.to_device(host_chunks, device).wait(),
        "scatter": lambda: scatter(device_chunks),
    }
    times = {name: [] for name in copies}
    for repeat in range(s.repeats + 1):  # the first round compiles
        for name, copy in copies.items():
            seconds = timed(copy)
            if repeat:
                times[name].append(seconds)
    return {name: float(np.min(t)) for name, t in times.items()}, state["pool"]


def report(quick: bool) -> str:
    s, device = setup(quick), jax.devices()[0]
    pool, block_ids = random_pool(s, device), slot_block_ids(s, device)
    m, gib = s.model, 2.0 ** 30
    rate = lambda nbytes, seconds: f"{nbytes / seconds / gib:,.2f} GiB/s"
    main = ["| blocks | MiB | offload | raw device→pinned_host | ours / raw | restore | "
            "raw pinned_host→device | ours / raw |", "|---|---|---|---|---|---|---|---|"]
    parts = ["| blocks | restore | its to_device | its scatter |", "|---|---|---|---|"]
    ratios = {}
    for n in s.sizes:
        t, pool = bench_size(s, n, pool, block_ids, device)
        nbytes = n * s.block_bytes
        ratios[n] = t["raw offload"] / t["offload"], t["raw restore"] / t["restore"]
        main.append(f"| {n} | {nbytes / 2 ** 20:,.1f} | {rate(nbytes, t['offload'])} | "
                    f"{rate(nbytes, t['raw offload'])} | {ratios[n][0]:.2f}x | "
                    f"{rate(nbytes, t['restore'])} | {rate(nbytes, t['raw restore'])} | "
                    f"{ratios[n][1]:.2f}x |")
        parts.append(f"| {n} | {t['restore'] * 1e3:,.2f} ms | {t['to_device'] * 1e3:,.2f} ms | "
                     f"{t['scatter'] * 1e3:,.2f} ms |")
    large = [r for n, r in ratios.items() if n >= 64]
    verdict = lambda r: f"{r:.2f}x ({'met' if r >= TARGET else 'missed'})"
    summary = [] if not large else [
        "", f"Target ours / raw >= {TARGET}x at >= 64 blocks: offload at worst "
        f"{verdict(min(r[0] for r in large))}, restore at worst "
        f"{verdict(min(r[1] for r in large))}. Device→host bandwidth at {s.largest} blocks: "
        f"{ratios[s.largest][0]:.0%} of the raw pinned copy's."]
    return "\n".join([
        f"{device.device_kind} ({device.platform}, {_report.machine()}), JAX {jax.__version__}, "
        f"{datetime.date.today()}. {m.num_layers} layers x {m.num_kv_heads} KV heads x "
        f"head_dim {m.head_dim}, {m.dtype}, blocks of {BLOCK_SIZE} tokens: "
        f"{s.block_bytes / 2 ** 10:,.0f} KiB of K and V per block; pool of {s.pool_blocks} "
        f"blocks ({pool.nbytes / gib:.2f} GiB). Fastest of {s.repeats} interleaved "
        "repetitions, each copy waited for.", "", *main, *summary, "",
        "The restore's parts, timed alone in the same rounds (fastest):", "", *parts])


def main(argv: list[str] | None = None) -> str:
    return _report.main(__file__, __doc__, report, argv)


if __name__ == "__main__":
    main()
