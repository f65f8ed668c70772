"""Keyed random draws: every number is a pure function of (seed, stream, keys).

Workloads draw their randomness per session and turn instead of from one sequential
generator. The think time of turn 3 of session 17 is then the same whatever other sessions the
workload holds, however many users replay it, and whatever order a simulator asks in; and the
first N sessions of a generated workload do not depend on how many were generated.

The draw is a SplitMix64 hash (Steele, Lea, Flood, "Fast splittable pseudorandom number
generators", OOPSLA 2014) of the seed, a stream id (one per kind of decision, so that two
decisions about the same turn are independent) and the integer keys, vectorised over numpy
uint64 arrays (arithmetic wraps modulo 2**64, as the hash requires).
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser over a uint64 array."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _MUL1
    x = (x ^ (x >> np.uint64(27))) * _MUL2
    return x ^ (x >> np.uint64(31))


def _hash(seed: int, stream: int, keys: tuple[np.ndarray | int, ...]) -> np.ndarray:
    arrays = np.broadcast_arrays(*(np.asarray(k, dtype=np.int64) for k in keys))
    h = np.full(arrays[0].shape, (seed * 0x100000001B3 + stream) % 2**64, dtype=np.uint64)
    h = _mix(h)
    for key in arrays:
        h = _mix(h ^ key.astype(np.uint64))
    return h


def uniform(seed: int, stream: int, *keys: np.ndarray | int) -> np.ndarray:
    """f64 in the open interval (0, 1), one per broadcast key."""
    bits = _hash(seed, stream, keys) >> np.uint64(11)
    return (bits.astype(np.float64) + 0.5) * 2.0**-53


def normal(seed: int, stream: int, *keys: np.ndarray | int) -> np.ndarray:
    """Standard normal f64 (Box-Muller over two independent keyed uniforms)."""
    radius = np.sqrt(-2.0 * np.log(uniform(seed, stream, *keys, 0)))
    return radius * np.cos(2.0 * np.pi * uniform(seed, stream, *keys, 1))


def exponential(mean: float, seed: int, stream: int, *keys: np.ndarray | int) -> np.ndarray:
    """Exponential f64 with the given mean (inverse CDF)."""
    return -mean * np.log(uniform(seed, stream, *keys))


def poisson(lam: float, seed: int, stream: int, *keys: np.ndarray | int) -> np.ndarray:
    """Poisson i64 with mean ``lam`` (inverse CDF, summed until the tail is below 1e-15)."""
    if not 0 <= lam <= 700:
        raise ValueError(f"poisson mean {lam!r}: expected a number in [0, 700]")
    u = uniform(seed, stream, *keys)
    count = np.zeros(u.shape, dtype=np.int64)
    if lam == 0:
        return count
    k, pmf = 0, np.exp(-lam)
    cdf = pmf
    while 1.0 - cdf > 1e-15 and k < 10 * lam + 50:
        count += u > cdf
        k += 1
        pmf *= lam / k
        cdf += pmf
    return count


def lognormal_tokens(mean, sigma, seed: int, stream: int, *keys: np.ndarray | int) -> np.ndarray:
    """i64 token counts: log-normal with the given mean (before rounding), rounded, >= 1.

    ``mean`` and ``sigma`` may be arrays broadcasting with the keys.
    """
    mu = np.log(mean) - np.square(sigma) / 2.0
    values = np.exp(mu + sigma * normal(seed, stream, *keys))
    return np.maximum(np.rint(values), 1).astype(np.int64)
