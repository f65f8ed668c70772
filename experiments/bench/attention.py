"""Paged attention benchmark: our kernels against JAX's stock Pallas kernel, XLA and cuDNN.

On a GPU: Llama-3.1-8B attention geometry (32 query heads, 8 KV heads, head_dim 128, bf16,
blocks of 16). Decode at batch {1, 16, 64} x context {512, 2048, 8192}: time, KV bytes read
per second and its fraction of the device's peak (the specification's and a measured
device-to-device copy's), and ratios against JAX's stock Pallas GPU paged attention (same
pages) and XLA attention on contiguous K/V. Prefill at 1 x 4096 tokens and 8 chunks of 1024
over 2048 tokens of context: time, TFLOP/s, ratios against XLA attention and
``jax.nn.dot_product_attention`` with cuDNN on contiguous K/V.

Elsewhere the same comparisons run at small sizes with the Pallas kernels interpreted: a
check that every implementation agrees and that the script works, not a speed measurement.

Every row first checks the result against XLA attention on the same K/V.

Usage: ``python experiments/bench/attention.py [--quick] [--out FILE.md]``.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

import _report  # beside this script
import pallas_kernels as pk

ON_GPU = jax.default_backend() == "gpu"
with warnings.catch_warnings():  # the stock Triton kernels warn on import from JAX 0.11.1
    warnings.simplefilter("ignore", DeprecationWarning)
    from jax.experimental.pallas.ops.gpu import paged_attention as stock

# Specification HBM bandwidths (bytes/s) by device kind prefix.
PEAK_BANDWIDTH = {"NVIDIA H100 PCIe": 2.0e12, "NVIDIA H100": 3.35e12, "NVIDIA H200": 4.8e12,
                  "NVIDIA A100-SXM4-80GB": 2.04e12, "NVIDIA A100": 1.56e12}


@dataclasses.dataclass(frozen=True)
class Geometry:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str

    @property
    def itemsize(self) -> int:
        return jnp.dtype(self.dtype).itemsize


LLAMA_8B = Geometry(32, 8, 128, 16, "bfloat16")
SMALL = Geometry(8, 2, 64, 16, "float32")
GPU_DECODE = [(b, n) for b in (1, 16, 64) for n in (512, 2048, 8192)]
GPU_PREFILL = [(1, 4096, 4096), (8, 1024, 2048)]  # (sequences, query tokens each, context)
CPU_DECODE = [(2, 64), (4, 256)]
CPU_PREFILL = [(1, 128, 128), (2, 32, 64)]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Pages:
    k_pages: jax.Array  # [KVH, NB, BS, D]
    v_pages: jax.Array
    tables: jax.Array  # i32[B, context / BS]
    dense_k: jax.Array  # [B, context, KVH, D] the same K/V, contiguous
    dense_v: jax.Array


def make_pages(rng: np.random.Generator, g: Geometry, batch: int, context: int) -> Pages:
    per_seq = context // g.block_size
    num_blocks = batch * per_seq + 1
    tables = rng.permutation(np.arange(1, num_blocks)).reshape(batch, per_seq).astype(np.int32)
    shape = (g.num_kv_heads, num_blocks, g.block_size, g.head_dim)
    k = jnp.asarray(rng.normal(size=shape), g.dtype)
    v = jnp.asarray(rng.normal(size=shape), g.dtype)
    dense = lambda pages: pages[:, tables].reshape(g.num_kv_heads, batch, context, g.head_dim
                                                  ).transpose(1, 2, 0, 3)
    return Pages(k, v, jnp.asarray(tables), dense(k), dense(v))


def median_seconds(fn, *args, repeats: int) -> float:
    """Median over ``repeats`` rounds of a few back-to-back calls (async dispatch hides the
    host between calls of a round, as in a serving loop)."""
    jax.block_until_ready(fn(*args))
    calls, times = 5 if ON_GPU else 1, []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / calls)
    return float(np.median(times))


def measured_copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy: read + write of 1 GiB (64 MiB off GPU)."""
    x = jnp.ones((1 << (28 if ON_GPU else 24),), jnp.float32)
    copy = jax.jit(lambda x: x + 0)
    return 2 * x.nbytes / median_seconds(copy, x, repeats=10)


def xla_attention(q, k, v, mask, scale):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")


def stock_decode(q, p: Pages, lengths, scale):
    """JAX's Pallas GPU paged attention: no softmax scale (q is pre-scaled) and k_splits must
    divide the pages per sequence."""
    pages = p.tables.shape[1]
    splits = max(s for s in (1, 2, 4, 8, 16) if pages % s == 0)
    return stock.paged_attention((q * scale).astype(q.dtype), p.k_pages, p.v_pages, p.tables,
                                 lengths, k_splits=splits, interpret=not ON_GPU)


def bench_decode(g: Geometry, batch: int, context: int, repeats: int) -> dict:
    rng = np.random.default_rng(batch * 100_000 + context)
    p = make_pages(rng, g, batch, context)
    q = jnp.asarray(rng.normal(size=(batch, g.num_heads, g.head_dim)), g.dtype)
    lengths = jnp.full((batch,), context, jnp.int32)
    scale = g.head_dim**-0.5
    impl = "pallas" if ON_GPU else "interpret"
    ours = jax.jit(functools.partial(pk.paged_decode_attention, sm_scale=scale, impl=impl))
    stock_fn = jax.jit(functools.partial(stock_decode, scale=scale))
    xla = jax.jit(lambda q, k, v: xla_attention(q[:, None], k, v, None, scale)[:, 0])
    expected = np.asarray(xla(q, p.dense_k, p.dense_v), np.float32)
    tolerance = 2e-2 if g.dtype != "float32" else 1e-4
    for name, out in (("ours", ours(q, p.k_pages, p.v_pages, p.tables, lengths)),
                      ("stock", stock_fn(q, p, lengths))):
        np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=tolerance,
                                   rtol=tolerance, err_msg=name)
    times = dict(ours=median_seconds(ours, q, p.k_pages, p.v_pages, p.tables, lengths,
                                     repeats=repeats),
                 stock=median_seconds(stock_fn, q, p, lengths, repeats=repeats),
                 xla=median_seconds(xla, q, p.dense_k, p.dense_v, repeats=repeats))
    kv_bytes = 2 * batch * context * g.num_kv_heads * g.head_dim * g.itemsize
    return dict(case=f"decode {batch} x {context}", bytes=kv_bytes, **times)


def bench_prefill(g: Geometry, seqs: int, queries: int, context: int, repeats: int) -> dict:
    rng = np.random.default_rng(seqs * 100_000 + queries)
    p = make_pages(rng, g, seqs, context)
    q = jnp.asarray(rng.normal(size=(seqs, queries, g.num_heads, g.head_dim)), g.dtype)
    scale = g.head_dim**-0.5
    contexts = jnp.full((seqs,), context, jnp.int32)
    starts = jnp.arange(seqs + 1, dtype=jnp.int32) * queries
    impl = "pallas" if ON_GPU else "interpret"
    ours = jax.jit(functools.partial(pk.paged_prefill_attention, sm_scale=scale, impl=impl))
    flat_q = q.reshape(seqs * queries, g.num_heads, g.head_dim)
    # The queries are the last `queries` tokens of the context (bottom-right causal mask).
    mask = (jnp.arange(context)[None, :] <= jnp.arange(context - queries, context)[:, None])
    xla = jax.jit(lambda q, k, v: xla_attention(q, k, v, mask[None, None], scale))
    expected = np.asarray(xla(q, p.dense_k, p.dense_v), np.float32).reshape(flat_q.shape)
    out = ours(flat_q, p.k_pages, p.v_pages, p.tables, contexts, starts)
    tolerance = 2e-2 if g.dtype != "float32" else 1e-4
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=tolerance,
                               rtol=tolerance)
    times = dict(ours=median_seconds(ours, flat_q, p.k_pages, p.v_pages, p.tables, contexts,
                                     starts, repeats=repeats),
                 xla=median_seconds(xla, q, p.dense_k, p.dense_v, repeats=repeats))
    if ON_GPU:
        cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, mask=mask[None, None], scale=scale, implementation="cudnn"))
        try:
            times["cudnn"] = median_seconds(cudnn, q, p.dense_k, p.dense_v, repeats=repeats)
        except Exception as error:  # cuDNN's support depends on the version and the mask
            times["cudnn_error"] = f"{type(error).__name__}: {str(error)[:120]}"
    visible = seqs * sum(context - queries + i + 1 for i in range(queries))
    flops = 4 * visible * g.num_heads * g.head_dim
    return dict(case=f"prefill {seqs} x {queries} over {context}", flops=flops, **times)


def report(quick: bool) -> str:
    g = LLAMA_8B if ON_GPU else SMALL
    device = jax.devices()[0]
    repeats = 3 if quick else 20
    decode_cases = (GPU_DECODE if ON_GPU else CPU_DECODE)[: 2 if quick else None]
    prefill_cases = (GPU_PREFILL if ON_GPU else CPU_PREFILL)[: 1 if quick else None]
    peak = next((v for k, v in PEAK_BANDWIDTH.items() if device.device_kind.startswith(k)), None)
    copy = measured_copy_bandwidth()
    us = lambda s: f"{s * 1e6:,.1f} us"
    lines = [f"{device.device_kind} ({device.platform}), JAX {jax.__version__}, "
             f"{datetime.date.today()}. {g}. Measured device copy: {copy / 1e9:,.0f} GB/s"
             + (f"; specification peak {peak / 1e9:,.0f} GB/s." if peak else "."),
             "" if ON_GPU else "Pallas kernels interpreted: timings are not kernel speed.", "",
             "| decode | ours | KV GB/s | of peak | of copy | stock | stock / ours | "
             "XLA dense | XLA / ours |", "|---|---|---|---|---|---|---|---|---|"]
    for batch, context in decode_cases:
        r = bench_decode(g, batch, context, repeats)
        rate = r["bytes"] / r["ours"]
        lines.append(f"| {batch} x {context} | {us(r['ours'])} | {rate / 1e9:,.0f} | "
                     f"{f'{rate / peak:.0%}' if peak else 'n/a'} | {rate / copy:.0%} | "
                     f"{us(r['stock'])} | {r['stock'] / r['ours']:.2f}x | {us(r['xla'])} | "
                     f"{r['xla'] / r['ours']:.2f}x |")
    lines += ["", "| prefill | ours | TFLOP/s | XLA dense | XLA / ours | cuDNN | cuDNN / ours |",
              "|---|---|---|---|---|---|---|"]
    for seqs, queries, context in prefill_cases:
        r = bench_prefill(g, seqs, queries, context, repeats)
        cudnn = (f"{us(r['cudnn'])} | {r['cudnn'] / r['ours']:.2f}x" if "cudnn" in r
                 else f"{r.get('cudnn_error', 'no GPU')} | n/a")
        lines.append(f"| {seqs} x {queries} over {context} | {us(r['ours'])} | "
                     f"{r['flops'] / r['ours'] / 1e12:.2f} | {us(r['xla'])} | "
                     f"{r['xla'] / r['ours']:.2f}x | {cudnn} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    return _report.main(__file__, __doc__, report, argv)


if __name__ == "__main__":
    main()
