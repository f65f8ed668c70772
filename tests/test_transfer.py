"""The host and disk tiers' data path: ``transfer`` (offload, restore, split), ``HostTier``
against a plain-Python model, and ``DiskTier`` round trips and damaged files.

References are independent of the code under test: numpy gathers of a pool's pages by the block
table's ids, and a list-based LRU model of the host tier.
"""

import dataclasses
import json

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import event, given, settings

from symphony_jax.config import CacheConfig, EngineConfig, SchedulerConfig, model_preset
from symphony_jax.memory import block_table as bt
from symphony_jax.memory import transfer
from symphony_jax.memory.disk_tier import DiskTier, DiskTierError, manifest_text
from symphony_jax.memory.host_tier import Entry, HostTier, HostTierFull
from symphony_jax.memory.kv_cache import KVPool, group_spans

DEVICE = jax.devices()[0]
BS = 4  # block size


def bits(array) -> np.ndarray:
    """The array's bytes as unsigned integers: equal bits, not merely equal values."""
    array = np.asarray(array)
    return array.view(f"u{array.dtype.itemsize}")


# ----------------------------------------------------------------------------------------------
# transfer: offload, then restore into other blocks of another pool


def engine_config(groups: int, dtype: str) -> EngineConfig:
    return EngineConfig(dataclasses.replace(model_preset("tiny"), dtype=dtype),
                        CacheConfig(block_size=BS, num_device_blocks=40 * groups,
                                    num_layer_groups=groups),
                        SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64,
                                        max_model_len=64, num_slots=3))


def table_with(config: EngineConfig, before: int, before_in_last: int,
               tokens: int) -> jax.Array:
    """Block ids of a table where slot 1 first takes ``before`` blocks in every group and slot
    2 ``before_in_last`` more in the last group (so groups differ), then slot 0 takes
    ``tokens`` tokens in every group."""
    table, G = bt.from_config(config), config.cache.num_layer_groups
    every, last = np.ones(G, bool), np.arange(G) == G - 1
    for slot, num_tokens, groups in ((1, before * BS, every), (2, before_in_last * BS, last),
                                     (0, tokens, every)):
        table, ok = bt.reserve(table, [slot], [num_tokens], groups)
        assert np.asarray(ok)[groups].all()
    return table.block_ids


def random_pool(config: EngineConfig, seed: int) -> KVPool:
    model, rng = config.model, np.random.default_rng(seed)
    rows = max(config.layer_groups.count(g) for g in set(config.layer_groups))
    shape = (rows, model.num_kv_heads, config.cache.num_device_blocks, BS, model.head_dim)
    page = lambda: jax.device_put(
        jnp.asarray(rng.standard_normal(shape, np.float32), model.dtype), DEVICE)
    return KVPool(page(), page())


def pool_row(layer_groups, layer: int) -> int:
    """The pool row of a layer: how many layers of its group come before it."""
    return layer_groups[:layer].count(layer_groups[layer])


def reference_pages(pages: np.ndarray, block_ids, layer_groups, slot: int, first: int,
                    n: int) -> np.ndarray:
    """[L, KVH, n, BS, D]: each layer's row of the pages at its group's ids, columns
    first..first+n."""
    ids = np.asarray(block_ids)[list(layer_groups), slot, first:first + n]  # [L, n]
    return np.stack([pages[pool_row(layer_groups, layer)][:, ids[layer]]
                     for layer in range(len(layer_groups))])


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("first, num_blocks, largest, runs", [
    (0, 11, 4, [(0, 4), (4, 4), (8, 2), (10, 1)]),
    (3, 7, 8, [(3, 4), (7, 2), (9, 1)]),
])
def test_offload_then_restore_into_other_blocks_is_bit_identical(groups, dtype, first,
                                                                 num_blocks, largest, runs):
    """Chunks keep each layer group apart; the upper group comes back alone first (writing
    nothing else), then the others."""
    config = engine_config(groups, dtype)
    layer_groups, tokens = config.layer_groups, (first + num_blocks) * BS - 1
    src_ids, dst_ids = table_with(config, 0, 5, tokens), table_with(config, 14, 3, tokens)
    columns = slice(first, first + num_blocks)
    for g in range(groups):
        assert set(np.asarray(src_ids)[g, 0, columns]).isdisjoint(
            np.asarray(dst_ids)[g, 0, columns])
    src, dst = random_pool(config, 0), random_pool(config, 1)
    src_pages = {name: np.asarray(getattr(src, name)) for name in ("k", "v")}
    dst_before = {name: np.asarray(getattr(dst, name)) for name in ("k", "v")}

    out = transfer.offload(src, src_ids, 0, first, num_blocks, layer_groups=layer_groups,
                           largest=largest)
    assert [(c.first_block, c.num_blocks) for c in out.chunks] == runs
    chunks = out.wait()
    assert out.is_ready()
    for c in chunks:
        assert c.first_group == 0 and c.pool_blocks == groups * c.num_blocks
        for name in ("k", "v"):
            arrays = getattr(c, name)
            assert [a.shape[0] for a in arrays] == [size for _, _, size in
                                                    group_spans(layer_groups)]
            assert all(a.sharding.memory_kind == "pinned_host" and a.dtype == dtype
                       for a in arrays)
            expected = reference_pages(src_pages[name], src_ids, layer_groups, 0,
                                       c.first_block, c.num_blocks)
            np.testing.assert_array_equal(bits(np.concatenate(arrays)), bits(expected))

    restored_ids = np.asarray(dst_ids)[list(layer_groups), 0, columns]  # [L, n]
    for lowest in (groups - 1, 0):  # the upper group alone, then every group
        back = transfer.to_device([c.groups(lowest, groups) for c in chunks], DEVICE)
        back.wait()
        assert all(a.sharding.memory_kind == "device" for c in back.chunks for a in c.k)
        for c in back.chunks:
            dst = transfer.write(dst, c, dst_ids, 0)
        loaded = np.asarray(layer_groups) >= lowest  # bool[L]
        written = np.zeros(dst.k.shape[:1] + dst.k.shape[2:3], bool)  # [rows, NB]
        for layer in np.flatnonzero(loaded):
            written[pool_row(layer_groups, layer), restored_ids[layer]] = True
        for name in ("k", "v"):
            after = np.asarray(getattr(dst, name))
            got = reference_pages(after, dst_ids, layer_groups, 0, first, num_blocks)
            want = reference_pages(src_pages[name], src_ids, layer_groups, 0, first,
                                   num_blocks)
            np.testing.assert_array_equal(bits(got[loaded]), bits(want[loaded]))
            for row in range(after.shape[0]):  # every other (row, block) is untouched
                np.testing.assert_array_equal(bits(after[row][:, ~written[row]]),
                                              bits(dst_before[name][row][:, ~written[row]]))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), rows=st.integers(1, 4), data=st.data(),
       num_blocks=st.integers(1, 5))
def test_both_ways_of_writing_blocks_match_numpy(seed, rows, data, num_blocks):
    """``scatter`` runs ``_put_by_slices`` on CPU and ``_put_by_scatter`` elsewhere: both are
    checked here, on CPU, against numpy's indexed assignment (a layer group of ``layers``
    layers into the first rows of its blocks)."""
    layers = data.draw(st.integers(1, rows))
    rng = np.random.default_rng(seed)
    pages = rng.standard_normal((rows, 2, 20, BS, 3)).astype(np.float32)
    new = rng.standard_normal((layers, 2, num_blocks, BS, 3)).astype(np.float32)
    ids = rng.permutation(20)[:num_blocks].astype(np.int32)
    expected = pages.copy()
    expected[:layers, :, ids] = new
    for put in (transfer._put_by_slices, transfer._put_by_scatter):
        np.testing.assert_array_equal(np.asarray(jax.jit(put)(pages, ids, new)), expected)


@given(first=st.integers(0, 1000), num_blocks=st.integers(0, 1000),
       largest=st.sampled_from([1, 2, 4, 64, 1024]))
def test_split_into_power_of_two_runs(first, num_blocks, largest):
    runs = transfer.split(first, num_blocks, largest)
    covered = [block for start, n in runs for block in range(start, start + n)]
    assert covered == list(range(first, first + num_blocks))  # contiguous, exact
    lengths = [n for _, n in runs]
    assert all(n & (n - 1) == 0 and 1 <= n <= largest for n in lengths)
    assert lengths == sorted(lengths, reverse=True)


# ----------------------------------------------------------------------------------------------
# HostTier against a plain-Python model


@dataclasses.dataclass(frozen=True)
class FakeChunk:
    first_block: int
    num_blocks: int

    @property
    def nbytes(self) -> int:
        return self.num_blocks * BLOCK_BYTES

    def is_ready(self) -> bool:
        return True


BLOCK_BYTES = 8
CAPACITY = 12
KEYS = range(5)


class Model:
    """The host tier as a list in recency order (least recent first) of
    ``(key, runs, tokens)``, runs ``(first_block, num_blocks)``."""

    def __init__(self):
        self.entries, self.evictions, self.evicted_tokens = [], 0, 0

    def find(self, key):
        return next((e for e in self.entries if e[0] == key), None)

    def blocks(self, key=None) -> int:
        return sum(n for k, runs, _ in self.entries if key in (None, k) for _, n in runs)

    def touch(self, key):
        entry = self.find(key)
        if entry:
            self.entries.remove(entry)
            self.entries.append(entry)

    def drop(self, key):
        self.entries = [e for e in self.entries if e[0] != key]

    def extend(self, key, runs, tokens, protect):
        """What ``HostTier.extend`` must do: the outcome's name and the evicted keys."""
        stored = self.find(key)[1] if self.find(key) else []
        first = runs[0][0] if runs else self.blocks(key)
        kept = [(f, n) for f, n in stored if f + n <= first]
        if sum(n for _, n in kept) != first:
            return "ValueError", []
        others = [e for e in self.entries if e[0] != key]
        need = first + sum(n for _, n in runs)
        evicted = []
        for entry in [e for e in others if e[0] not in protect]:
            if need + sum(n for e in others for _, n in e[1]) <= CAPACITY:
                break
            others.remove(entry)
            evicted.append(entry)
        if need + sum(n for e in others for _, n in e[1]) > CAPACITY:
            return "HostTierFull", []
        self.entries = others + [(key, kept + list(runs), tokens)]
        self.evictions += len(evicted)
        self.evicted_tokens += sum(tokens for _, _, tokens in evicted)
        return "ok", [k for k, _, _ in evicted]


def state_of(tier: HostTier):
    return [(key, [(c.first_block, c.num_blocks) for c in e.chunks], e.tokens)
            for key, e in tier.entries.items()]


@st.composite
def extensions(draw, model: Model):
    """Arguments of an ``extend``: mostly appends, some replacing the last chunk (a trailing
    partial block), some starting at a wrong block."""
    key = draw(st.sampled_from(KEYS))
    stored = model.find(key)[1] if model.find(key) else []
    end = sum(n for _, n in stored)
    starts = [end, end + 1] + ([stored[-1][0]] if stored else [])
    first = draw(st.sampled_from(starts))
    lengths = draw(st.lists(st.sampled_from([1, 2, 4]), max_size=3))
    runs, at = [], first
    for n in lengths:
        runs.append((at, n))
        at += n
    tokens = draw(st.integers(0, at * BS))
    protect = draw(st.sets(st.sampled_from(KEYS), max_size=2))
    return key, runs, tokens, protect


@settings(max_examples=60)
@given(data=st.data())
def test_host_tier_matches_a_python_model(data):
    tier, model = HostTier(CAPACITY, BLOCK_BYTES), Model()
    for _ in range(data.draw(st.integers(1, 30))):
        op = data.draw(st.sampled_from(["extend", "extend", "extend", "touch", "drop"]))
        if op == "extend":
            key, runs, tokens, protect = data.draw(extensions(model))
            before = state_of(tier), tier.used_blocks, tier.evictions
            expected, evicted_keys = model.extend(key, runs, tokens, protect)
            event(f"extend: {expected}, {min(len(evicted_keys), 2)} evicted")
            chunks = [FakeChunk(f, n) for f, n in runs]
            if expected == "ok":
                evicted = tier.extend(key, chunks, tokens, protect=protect)
                assert [k for k, _ in evicted] == evicted_keys
                assert all(isinstance(e, Entry) for _, e in evicted)
            else:
                error = ValueError if expected == "ValueError" else HostTierFull
                with pytest.raises(error):
                    tier.extend(key, chunks, tokens, protect=protect)
                assert (state_of(tier), tier.used_blocks, tier.evictions) == before
        else:
            key = data.draw(st.sampled_from(KEYS))
            getattr(tier, op)(key)
            getattr(model, op)(key)
        assert state_of(tier) == model.entries
        assert tier.used_blocks == model.blocks() <= CAPACITY
        assert tier.used_bytes == tier.used_blocks * BLOCK_BYTES
        assert (tier.evictions, tier.evicted_tokens) == (model.evictions, model.evicted_tokens)


def test_host_tier_replaces_a_trailing_partial_block():
    tier = HostTier(8, BLOCK_BYTES)
    tier.extend("a", [FakeChunk(0, 4), FakeChunk(4, 1)], 4 * BS + 1)
    assert tier.written_blocks("a", BS) == 4
    assert tier.extend("a", [FakeChunk(4, 2), FakeChunk(6, 1)], 7 * BS) == []
    assert state_of(tier) == [("a", [(0, 4), (4, 2), (6, 1)], 7 * BS)]
    assert tier.used_blocks == 7 and tier.get("a").nbytes == 7 * BLOCK_BYTES


# ----------------------------------------------------------------------------------------------
# DiskTier


def host_entry(seed: int = 0) -> Entry:
    """Chunks of 4, 2 and 1 blocks in pinned host memory, float32 and bfloat16, each of two
    layer groups (of 2 layers and 1)."""
    rng, sharding = np.random.default_rng(seed), transfer.host_sharding(DEVICE)
    page = lambda layers, n, dtype: jax.device_put(
        jnp.asarray(rng.standard_normal((layers, 2, n, BS, 8), np.float32), dtype), sharding)
    group_pages = lambda n, dtype: tuple(page(layers, n, dtype) for layers in (2, 1))
    chunks = [transfer.Chunk(first, group_pages(n, dtype), group_pages(n, dtype))
              for first, n, dtype in ((0, 4, jnp.float32), (4, 2, jnp.bfloat16),
                                      (6, 1, jnp.bfloat16))]
    return Entry(chunks, 7 * BS - 2)


def assert_same_entry(loaded: Entry, saved: Entry) -> None:
    assert loaded.tokens == saved.tokens
    assert ([(c.first_block, c.first_group) for c in loaded.chunks]
            == [(c.first_block, c.first_group) for c in saved.chunks])
    for got, want in zip(loaded.chunks, saved.chunks, strict=True):
        for name in ("k", "v"):
            for a, b in zip(getattr(got, name), getattr(want, name), strict=True):
                assert a.sharding.memory_kind == "pinned_host"
                assert (a.shape, a.dtype) == (b.shape, b.dtype)
                np.testing.assert_array_equal(bits(a), bits(b))


def test_disk_tier_round_trip_into_pinned_host(tmp_path):
    tier, entry = DiskTier(tmp_path), host_entry()
    tier.save(7, entry)
    assert 7 in tier and 3 not in tier and tier.keys() == [7]
    assert tier.used_bytes > 0
    assert_same_entry(tier.load(7, DEVICE), entry)
    replacement = Entry(entry.chunks[:1], 4 * BS)
    tier.save(7, replacement)  # replaces the entry
    assert_same_entry(tier.load(7, DEVICE), replacement)
    assert_same_entry(DiskTier(tmp_path).load(7, DEVICE), replacement)  # reopened
    assert sorted(p.name for p in tmp_path.iterdir()) == ["7"]  # no temporaries left


def test_disk_tier_drop_removes_the_files(tmp_path):
    tier = DiskTier(tmp_path)
    tier.save(1, host_entry(1))
    tier.save(2, host_entry(2))
    assert tier.drop(1) and not tier.drop(1)
    assert tier.keys() == [2] and not (tmp_path / "1").exists()
    assert tier.drop(2) and tier.used_bytes == 0 and list(tmp_path.iterdir()) == []
    with pytest.raises(DiskTierError, match=str(tmp_path / "2")):
        tier.load(2, DEVICE)


def test_disk_tier_removes_leftover_temporaries(tmp_path):
    (tmp_path / ".tmp-5").mkdir()  # a save that crashed before its rename
    (tmp_path / ".tmp-5" / "manifest.json").write_text("{}")
    tier = DiskTier(tmp_path)
    assert tier.keys() == [] and 5 not in tier and list(tmp_path.iterdir()) == []


def largest_array_file(entry_dir):
    """The largest file of the entry's checkpoint (one holding array data)."""
    return max((f for f in (entry_dir / "arrays").rglob("*") if f.is_file()),
               key=lambda f: f.stat().st_size)


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def flip_middle_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def delete(path):
    path.unlink()
    return path


def edit_manifest(edit, keep_checksum: bool):
    """A damage: ``edit`` applied to the stored manifest; with ``keep_checksum`` the file's
    own CRC-32 is recomputed, as if the arrays (not the manifest) had changed."""
    def damage(entry_dir):
        path = entry_dir / "manifest.json"
        stored = json.loads(path.read_text())
        edit(stored["manifest"])
        path.write_text(manifest_text(stored["manifest"]) if keep_checksum
                        else json.dumps(stored))
        return entry_dir / "arrays" if keep_checksum else path

    return damage


# Each damages an entry's directory and returns the path the error must name; and what the
# error must say.
DAMAGES = {
    "deleted array file": (lambda d: delete(largest_array_file(d)), "missing, expected"),
    "truncated array file": (lambda d: truncate(largest_array_file(d)), "truncated or corrupt"),
    "corrupted array file": (lambda d: flip_middle_byte(largest_array_file(d)),
                             "truncated or corrupt"),
    "deleted manifest": (lambda d: delete(d / "manifest.json"), "missing, expected"),
    "truncated manifest": (lambda d: truncate(d / "manifest.json"), "malformed"),
    "edited tokens": (edit_manifest(lambda m: m.update(tokens=1), keep_checksum=False),
                      "edited or corrupt"),
    "edited first block": (edit_manifest(lambda m: m["chunks"][1].update(first_block=5),
                                         keep_checksum=False), "edited or corrupt"),
    "array checksum differs": (edit_manifest(
        lambda m: m["chunks"][1]["k"][0].update(crc32=1), keep_checksum=True),
        "chunk 1 k[0] has crc32"),
    "array shape differs": (edit_manifest(
        lambda m: m["chunks"][0]["v"][1].update(shape=[1, 2, 3, BS, 8]), keep_checksum=True),
        "chunk 0 v[1] is"),
    "a layer group missing": (edit_manifest(lambda m: m["chunks"][2]["v"].pop(),
                                            keep_checksum=True), "chunk 2 v has 2 layer groups"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_disk_tier_damaged_entry_raises_naming_the_file(tmp_path, damage):
    tier = DiskTier(tmp_path)
    tier.save(3, host_entry())
    apply, says = DAMAGES[damage]
    culprit = apply(tmp_path / "3")
    with pytest.raises(DiskTierError, match="expected") as raised:
        tier.load(3, DEVICE)
    assert str(raised.value).startswith(f"{culprit}: ") and says in str(raised.value)


def test_disk_tier_missing_entry_and_bad_arguments(tmp_path):
    tier = DiskTier(tmp_path)
    with pytest.raises(DiskTierError, match="missing"):
        tier.load(4, DEVICE)
    with pytest.raises(ValueError, match="no chunks"):
        tier.save(4, Entry([], 0))
    with pytest.raises(TypeError, match="integer"):
        tier.save("4", host_entry())
