"""The prefix cache against an exact model, with the engine's real keys.

- Its sets: keys spread evenly over them (a chi-square test that the old direct-mapped buckets
  fail), the engine's hashes and the simulator's small-integer ids alike.
- Forged keys: a block cached under a key is served only to the prefix it was computed for,
  even when another prompt's block has the same key by construction.
- An exact model, a Python dict from (salt, prefix) to its cached block with the same capacity
  and LRU order, served the same random stream of prompts (two seeds and pool sizes): the jitted
  cache finds at least 99% of the blocks the model finds, and never serves a block computed for
  another prefix or salt.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from block_table_checks import check_structure, snapshot
from symphony_jax.engine import hashing
from symphony_jax.memory import block_table as bt
from symphony_jax.scheduler import prefix_cache as pc

BS, NB, MB = 4, 48, 10
i32 = jnp.int32


def named(tokens: list[int], salt: str | None, salt_id: int) -> pc.Prefixes:
    """One sequence's blocks as the engine names them: BLAKE2s keys, token ids, root tag."""
    keys = np.zeros((1, MB, pc.KEY_WORDS), np.uint32)
    full = hashing.prompt_keys(tokens, BS, hashing.root_key(salt))
    keys[0, :len(full)] = full
    content = np.zeros((1, MB * BS), np.int32)
    content[0, :len(tokens)] = tokens
    return pc.Prefixes(jnp.asarray(keys), jnp.asarray(content.reshape(1, MB, BS)),
                       jnp.asarray([pc.root_tag(salt_id)], jnp.uint32))


@functools.partial(jax.jit, donate_argnames=("cache", "table"))
def serve(cache, table, prefixes, num_tokens, now):
    """One sequence of ``num_tokens`` tokens in slot 0, as the scheduler runs it: take its
    cached prefix (all but its last token), evict for the blocks it still needs, compute them,
    register its full blocks, finish. Returns the cache, the table, the sequence's blocks and
    how many came from the cache."""
    blocks, count = pc.match(cache, prefixes, ((num_tokens - 1) // BS)[None])
    table, _ = bt.adopt(table, jnp.where(count > 0, 0, table.num_slots), blocks, count)
    cache = pc.touch(cache, blocks, now)
    needed = -(-num_tokens // BS) - count[0]
    cache, table = pc.evict(cache, table, jnp.maximum(needed - table.free_top, 0))
    table, ok = bt.reserve(table, jnp.zeros(1, i32), (num_tokens - count[0] * BS)[None])
    row = table.block_ids[0, :1]
    full = jnp.arange(MB) < num_tokens // BS
    cache, table = pc.register(cache, table, prefixes, row, full[None], now)
    return cache, bt.free(table, jnp.zeros(1, i32)), row[0], count[0], ok.all()


class ExactModel:
    """A fully associative LRU cache of (salt, prefix) with room for ``capacity`` blocks: the
    least recently used first, of equally recent ones the deepest; blocks in use stay."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used: dict[tuple, tuple[float, int]] = {}  # (salt, prefix) -> (when, depth)

    def serve(self, salt, tokens: list[int], now: float) -> int:
        names = [(salt, tuple(tokens[:(j + 1) * BS])) for j in range(len(tokens) // BS)]
        limit = (len(tokens) - 1) // BS
        hits = 0
        while hits < limit and names[hits] in self.used:
            hits += 1
        for j in range(hits):
            self.used[names[j]] = (now, j)
        needed = -(-len(tokens) // BS) - hits
        excess = len(self.used) + needed - self.capacity
        if excess > 0:
            candidates = sorted((name for name in self.used if name not in names[:hits]),
                                key=lambda name: (self.used[name][0], -self.used[name][1]))
            for name in candidates[:excess]:
                del self.used[name]
        run = hits
        while run < len(names) and names[run] in self.used:
            run += 1
        for j in range(run, len(names)):
            self.used[names[j]] = (now, j)
        return hits


def conversation_stream(count: int, seed: int):
    """Prompts that share prefixes the way chat traffic does: a tenant's system prompt, one of a
    few popular first questions, then a tail of their own (not always a whole block)."""
    rng = np.random.default_rng(seed)
    systems = [rng.integers(0, 32_000, BS * rng.integers(1, 4)).tolist() for _ in range(6)]
    questions = [rng.integers(0, 32_000, BS * rng.integers(1, 4)).tolist() for _ in range(12)]
    for _ in range(count):
        salt = [None, "tenant-a"][rng.integers(0, 2)]
        tail = rng.integers(0, 32_000, rng.integers(1, 3 * BS)).tolist()
        prompt = (systems[rng.integers(0, len(systems))]
                  + questions[rng.integers(0, len(questions))] + tail)[:MB * BS]
        yield salt, prompt


@pytest.mark.parametrize("seed, num_blocks", [(0, NB), (1, NB // 2)])
def test_the_cache_finds_what_an_exact_model_finds_and_never_a_wrong_block(seed, num_blocks):
    cache, table = pc.create(num_blocks, BS), bt.create(1, num_blocks, MB, BS)
    model = ExactModel(num_blocks - 1)
    salts = {None: 0, "tenant-a": 1}
    computed_for: dict[int, tuple] = {}  # block -> the (salt, prefix) its K,V holds
    found = expected = 0
    for t, (salt, prompt) in enumerate(conversation_stream(400, seed)):
        cache, table, row, count, ok = serve(cache, table, named(prompt, salt, salts[salt]),
                                             jnp.asarray(len(prompt), i32), jnp.float32(t))
        row, count = np.asarray(row).tolist(), int(count)
        assert bool(ok)
        for j in range(count):
            assert computed_for[row[j]] == (salt, tuple(prompt[:(j + 1) * BS])), (
                f"prompt {t} was served block {row[j]} computed for another prefix")
        for j in range(count, -(-len(prompt) // BS)):
            computed_for[row[j]] = (salt, tuple(prompt[:(j + 1) * BS]))
        found += count
        expected += model.serve(salt, prompt, float(t))
    assert expected > 200  # the stream reuses prefixes, and the cache is small enough to evict
    assert found >= 0.99 * expected, f"found {found} cached blocks, the exact model {expected}"
    cached = (np.asarray(cache.block_keys) != 0).any(-1)
    check_structure(snapshot(table), BS, cached.astype(np.int64))


def test_a_forged_key_is_never_served_another_prefixs_block():
    """B's blocks have A's keys (a collision, built on purpose) but other tokens: neither is
    served the other's blocks, whatever the order, nor a block cached after the other's."""
    a = list(range(100, 108))
    b = [7, 7, 7, 7] + a[4:]  # same second block, different first
    forged = dataclasses.replace(named(b, None, 0), keys=named(a, None, 0).keys)
    cache, table = pc.create(NB, BS), bt.create(2, NB, MB, BS)
    cache, table, row_a, count, _ = serve(cache, table, named(a + [1], None, 0),
                                          jnp.asarray(9, i32), jnp.float32(0))
    assert int(count) == 0
    blocks, counts = pc.match(cache, forged, jnp.asarray([2]))
    assert int(counts[0]) == 0  # A's first block has B's key but not B's tokens
    # B is computed and registered: its blocks replace A's stale entries (same keys).
    cache, table, row_b, count, _ = serve(cache, table, forged, jnp.asarray(8, i32),
                                          jnp.float32(1))
    assert int(count) == 0
    blocks, counts = pc.match(cache, named(a, None, 0), jnp.asarray([2]))
    assert int(counts[0]) == 0
    # Hold B's second block in a slot, evict B's first, and register A again: A's first block
    # enters, but B's second, held, keeps its entry. Its tokens are A's second block's and its
    # key is A's, yet its K,V was computed after B's first block: not a hit for A.
    b1 = np.asarray(row_b)[1]
    table, _ = bt.adopt(table, jnp.asarray([1]), jnp.zeros((1, MB), i32).at[0, 0].set(b1),
                        jnp.asarray([1]))
    cache, table = pc.evict(cache, table, jnp.asarray(1))
    assert int(pc.lookup(cache, named(a, None, 0).keys[0, 1])) == b1
    cache, table, row_a2, count, _ = serve(cache, table, named(a + [1], None, 0),
                                           jnp.asarray(9, i32), jnp.float32(2))
    assert int(count) == 0
    blocks, counts = pc.match(cache, named(a + [1], None, 0), jnp.asarray([2]))
    assert int(counts[0]) == 1 and int(blocks[0, 0]) == np.asarray(row_a2)[0]


def test_salts_share_within_and_never_across():
    tokens = list(range(1, 14))
    cache, table = pc.create(NB, BS), bt.create(1, NB, MB, BS)
    for t, salt, salt_id, shared in ((0, "x", 1, 0), (1, "x", 1, 3), (2, "y", 2, 0),
                                     (3, None, 0, 0), (4, "y", 2, 3)):
        cache, table, _, count, _ = serve(cache, table, named(tokens, salt, salt_id),
                                          jnp.asarray(len(tokens), i32), jnp.float32(t))
        assert int(count) == shared, (salt, t)
    # Same keys, different root tags (a salt's keys replayed under another): no hit either.
    replayed = dataclasses.replace(named(tokens, "x", 1),
                                   root=jnp.asarray([pc.root_tag(2)], jnp.uint32))
    assert int(pc.match(cache, replayed, jnp.asarray([3]))[1][0]) == 0


# --- How evenly keys spread over sets. ------------------------------------------------------

def chi_square_is_uniform(sets: np.ndarray, num_sets: int) -> bool:
    """Whether counts of ``sets`` pass a chi-square test of uniformity at p = 1e-4 (the
    critical value by Wilson and Hilferty's approximation)."""
    counts = np.bincount(sets, minlength=num_sets)
    expected = len(sets) / num_sets
    statistic = ((counts - expected) ** 2 / expected).sum()
    k, z = num_sets - 1, 3.719
    critical = k * (1 - 2 / (9 * k) + z * np.sqrt(2 / (9 * k))) ** 3
    return statistic < critical


def polynomial_keys(blocks: np.ndarray) -> np.ndarray:
    """u32[N, MB, 2]: the keys an earlier version used, two polynomial lanes over the tokens
    (odd multipliers), for ``blocks: int[N, MB, BS]``."""
    keys = []
    for p, m in ((0x01000193, 0x85EBCA6B), (0x9E3779B1, 0xC2B2AE35)):
        content = np.zeros(blocks.shape[:2], np.uint64)
        for t in range(blocks.shape[2]):
            content = (content * p + blocks[..., t].astype(np.uint64) + 1) % 2**32
        lane = np.zeros(blocks.shape[0], np.uint64)
        chained = []
        for j in range(blocks.shape[1]):
            lane = (lane * m + content[:, j]) % 2**32
            chained.append(lane)
        keys.append(np.stack(chained, 1))
    return np.stack(keys, -1).astype(np.uint32)


def direct_mapped_bucket(keys: np.ndarray, num_buckets: int) -> np.ndarray:
    """The earlier version's bucket of a two-word key."""
    mixed = keys[..., 0] ^ (keys[..., 1].astype(np.uint64) * 0x9E3779B1 % 2**32).astype(
        np.uint32)
    return (mixed & (num_buckets - 1)).astype(np.int64)


@pytest.fixture(scope="module")
def random_prompts():
    rng = np.random.default_rng(3)
    return rng.integers(0, 32_000, (2000, 8, BS))


def test_engine_keys_spread_evenly_over_sets(random_prompts):
    root = hashing.root_key(None)
    keys = np.concatenate([hashing.prompt_keys(p.reshape(-1).tolist(), BS, root)
                           for p in random_prompts])
    sets = np.asarray(pc.set_of(jnp.asarray(keys), 256))
    assert chi_square_is_uniform(sets, 256)
    # The test has the power to see the old scheme's bias: every old bucket was even.
    old = direct_mapped_bucket(polynomial_keys(random_prompts).reshape(-1, 2), 256)
    assert (old % 2 == 0).all() and not chi_square_is_uniform(old, 256)


def test_simulator_ids_spread_evenly_over_sets():
    owners, blocks = np.meshgrid(np.arange(1, 2001), np.arange(1, 9), indexing="ij")
    keys = np.zeros((owners.size, pc.KEY_WORDS), np.uint32)
    keys[:, 0], keys[:, 1] = owners.reshape(-1), blocks.reshape(-1)
    assert chi_square_is_uniform(np.asarray(pc.set_of(jnp.asarray(keys), 256)), 256)
