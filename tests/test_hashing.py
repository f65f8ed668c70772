"""Block keys against a sequential uint32 computation, and the prefix property."""

import jax.numpy as jnp
import numpy as np

from symphony_jax.engine.hashing import LANES, block_keys


def reference_keys(tokens: list[int], block_size: int) -> list[tuple[int, int]]:
    keys, chain = [], [0, 0]
    for start in range(0, len(tokens) - block_size + 1, block_size):
        lane_keys = []
        for lane, (p, m) in enumerate(LANES):
            content = 0
            for token in tokens[start:start + block_size]:
                content = (content * p + token + 1) % 2**32
            chain[lane] = (chain[lane] * m + content) % 2**32
            lane_keys.append(chain[lane])
        keys.append(tuple(lane_keys) if any(lane_keys) else (0, 1))
    return keys


def test_keys_equal_a_sequential_computation():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50_000, (3, 40)).astype(np.int32)
    lengths = np.array([40, 17, 3], np.int32)
    got = np.asarray(block_keys(jnp.asarray(tokens), jnp.asarray(lengths), 8, 6))
    for row, n in zip(range(3), lengths):
        expected = reference_keys(tokens[row, :n].tolist(), 8)
        assert [tuple(k) for k in got[row, : len(expected)].tolist()] == expected
        assert not got[row, len(expected):].any(), "blocks that are not full have no key"


def test_equal_prefixes_equal_keys_and_a_change_changes_every_later_key():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 1000, 32).astype(np.int32)
    b = a.copy()
    b[13] += 1  # block 1 of 4
    keys = np.asarray(block_keys(jnp.asarray(np.stack([a, b])), jnp.asarray([32, 32]), 8, 4))
    assert (keys[0, 0] == keys[1, 0]).all()
    assert all((keys[0, j] != keys[1, j]).any() for j in (1, 2, 3))
