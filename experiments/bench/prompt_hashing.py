"""Prompt hashing benchmark: the prefix cache's BLAKE2s block keys against polynomial ones.

The engine names each full block of an admitted prompt by a chained BLAKE2s-128 key computed on
the host with ``hashlib`` (``engine.hashing.prompt_keys``; a session's earlier blocks are not
hashed again). The baseline is the key an earlier version used: two polynomial hashes mod 2^32
over the token ids, chained by an associative scan, jitted, on the default device — fast, but
linear in the tokens, so a prompt can be built to collide with another's blocks. Both hash the
same prompts, interleaved (machine noise hits both alike); a sample is the fastest of 5 calls.
The baseline's tokens are already on the device (the engine sent them with the prompt).
The table gives tokens per second and the cost of one prompt.

A block that a sampled token completes is hashed on the device (``hashing.chain``) inside the
engine's step; its cost per step, for a batch of such blocks, is the last table.

Usage: ``python experiments/bench/prompt_hashing.py [--quick] [--out FILE.md]``.
"""

from __future__ import annotations

import datetime
import time

import jax
import jax.numpy as jnp
import numpy as np

import _report  # beside this script
from symphony_jax.engine import hashing

BLOCK = 16
u32 = jnp.uint32


def _powers(base: int, count: int) -> np.ndarray:
    powers = np.ones(count, np.uint64)
    for i in range(count - 2, -1, -1):
        powers[i] = (powers[i + 1] * base) % 2**32
    return powers.astype(np.uint32)


@jax.jit
def polynomial_keys(tokens: jax.Array) -> jax.Array:
    """u32[N, L // BLOCK, 2]: the baseline's keys of every full block of ``tokens: i32[N, L]``."""
    blocks = tokens.reshape(tokens.shape[0], -1, BLOCK).astype(u32) + u32(1)
    lanes = []
    for token_base, chain_base in ((0x01000193, 0x85EBCA6B), (0x9E3779B1, 0xC2B2AE35)):
        content = (blocks * jnp.asarray(_powers(token_base, BLOCK))).sum(-1, dtype=u32)
        combine = lambda x, y: (x[0] * y[0], x[1] * y[0] + y[1])
        lanes.append(jax.lax.associative_scan(
            combine, (jnp.full_like(content, chain_base), content), axis=1)[1])
    return jnp.stack(lanes, -1)


def check_device_chain(tokens: list[int], keys: np.ndarray, root: np.ndarray) -> None:
    """The device's keys of a prompt's blocks, chained one block at a time, are the host's."""
    parent = jnp.asarray(root)[None]
    for j, key in enumerate(keys[:4]):
        parent = hashing.chain(parent, jnp.asarray(tokens[j * BLOCK:(j + 1) * BLOCK])[None])
        if not (np.asarray(parent)[0] == key).all():
            raise AssertionError(f"block {j}: the device's key differs from the host's")


def fastest(call, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def report(quick: bool) -> str:
    rng = np.random.default_rng(0)
    lengths = (256, 2048) if quick else (256, 2048, 8192)
    root = hashing.root_key(None)
    lines = [f"{jax.devices()[0].platform} ({_report.machine()}), JAX {jax.__version__}, "
             f"{datetime.date.today()}. Blocks of {BLOCK} tokens.", "",
             "| prompt tokens | BLAKE2s (host) | tokens/s | polynomial (device, jitted) | "
             "tokens/s | BLAKE2s / polynomial time |", "|---|---|---|---|---|---|"]
    for length in lengths:
        tokens = rng.integers(0, 128_000, length)
        as_list, on_device = tokens.tolist(), jnp.asarray(tokens[None], jnp.int32)
        polynomial = lambda: polynomial_keys(on_device).block_until_ready()
        polynomial()  # compiled before timing
        samples = {"blake2s": [], "polynomial": []}
        for _ in range(3 if quick else 7):
            samples["blake2s"].append(fastest(lambda: hashing.prompt_keys(as_list, BLOCK, root)))
            samples["polynomial"].append(fastest(polynomial))
        new, old = (float(np.median(samples[k])) for k in ("blake2s", "polynomial"))
        check_device_chain(as_list, hashing.prompt_keys(as_list, BLOCK, root), root)
        lines.append(f"| {length:,} | {new * 1e6:,.0f} us | {length / new:,.0f} | "
                     f"{old * 1e6:,.0f} us | {length / old:,.0f} | {new / old:.2f}x |")
    lines += ["", "Blocks completed by sampled tokens, hashed on the device in a step "
              "(`hashing.chain`, jitted):", "", "| blocks | time per step |", "|---|---|"]
    chain = jax.jit(hashing.chain)
    for count in ((8, 64) if quick else (8, 64, 256)):
        parent = jnp.asarray(rng.integers(0, 2**32, (count, 4)), u32)
        block = jnp.asarray(rng.integers(0, 128_000, (count, BLOCK)), jnp.int32)
        chain(parent, block).block_until_ready()
        lines.append(f"| {count} | "
                     f"{fastest(lambda: chain(parent, block).block_until_ready()) * 1e6:,.0f} us |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    return _report.main(__file__, __doc__, report, argv)


if __name__ == "__main__":
    main()
