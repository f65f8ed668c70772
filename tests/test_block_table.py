"""Block-table behaviours worth stating one by one (the random walk is in the stateful test)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from symphony_jax.config import CacheConfig, EngineConfig, SchedulerConfig, model_preset
from symphony_jax.memory import block_table as bt

NB, S, MB, BS = 16, 4, 4, 4


def rows(table, group=0):
    return np.asarray(table.block_ids[group]).tolist()


def test_null_block_and_low_ids_first():
    table, ok = bt.allocate(bt.create(S, NB, MB, BS), [0, 1], [5, 4])
    assert np.asarray(ok).tolist() == [[True, True]]
    assert rows(table)[:2] == [[1, 2, 0, 0], [3, 0, 0, 0]]
    assert int(bt.num_free_blocks(table)) == NB - 1 - 3


def test_negative_slot_is_padding_not_the_last_slot():
    table, ok = bt.allocate(bt.create(S, NB, MB, BS), [-1, S], [4, 4])
    assert not np.asarray(ok).any()
    assert not np.asarray(table.block_ids).any() and int(table.free_top) == NB - 1


def test_grants_in_batch_order_and_stops_at_first_misfit():
    table = bt.create(S, 6, MB, BS)  # 5 usable blocks
    table, ok = bt.allocate(table, [0, 1, 2], [12, 12, 4])  # 3 + 3 + 1 blocks
    assert np.asarray(ok).tolist() == [[True, False, False]]
    # A request needing no block always succeeds; one needing a block waits behind a misfit.
    table, ok = bt.reserve(table, [3, 0, 2], [9, 0, 1])
    assert np.asarray(ok).tolist() == [[False, True, False]]
    table, ok = bt.reserve(table, [2, 3], [1, 9])
    assert np.asarray(ok).tolist() == [[True, False]]


def test_fork_shares_full_blocks_and_copies_the_partial_one():
    table, _ = bt.allocate(bt.create(S, NB, MB, BS), [0], [10])  # blocks 1, 2 full; 3 partial
    table, ok, copies = bt.fork(table, [0], [2])
    assert np.asarray(ok).tolist() == [[True]]
    assert rows(table)[2] == [1, 2, 4, 0]
    assert (int(copies.src[0, 0]), int(copies.dst[0, 0])) == (3, 4)
    assert np.asarray(table.ref_counts[:5]).tolist() == [0, 2, 2, 1, 1]
    # Appending to the child writes only its own block; the parent is untouched.
    table, _ = bt.reserve(table, [2], [3])
    assert rows(table)[0] == [1, 2, 3, 0] and rows(table)[2] == [1, 2, 4, 5]


def test_fork_of_whole_blocks_copies_nothing():
    table, _ = bt.allocate(bt.create(S, NB, MB, BS), [0], [8])
    table, ok, copies = bt.fork(table, [0], [1])
    assert np.asarray(ok).all() and int(copies.dst[0, 0]) == NB and int(copies.src[0, 0]) == 0


def test_max_new_blocks_bounds_the_growth_of_one_call():
    table, _ = bt.allocate(bt.create(S, NB, MB, BS), [0], [4])
    table, ok = bt.reserve(table, [0, 1], [5, 4], max_new_blocks=1)  # needs 2, then 1
    assert np.asarray(ok).tolist() == [[False, True]]


def test_length_beyond_table_width_fails():
    table, ok = bt.allocate(bt.create(S, NB, MB, BS), [0], [MB * BS + 1])
    assert not np.asarray(ok).any() and int(table.free_top) == NB - 1


def test_huge_request_fails_instead_of_overflowing():
    table, _ = bt.allocate(bt.create(S, NB, MB, BS), [0], [5])
    table, ok = bt.reserve(table, [0], [2**31 - 3])
    assert not np.asarray(ok).any() and int(table.num_tokens[0, 0]) == 5
    with pytest.raises(ValueError, match="num_new_tokens has values outside int32"):
        bt.reserve(table, [0], [2**40])


def test_slot_mapping_points_padding_out_of_range():
    table, _ = bt.allocate(bt.create(S, NB, MB, BS), [1], [6])  # blocks 1, 2
    mapping = bt.slot_mapping(table, [1, 1, 1, 1, 0, -1], [0, 5, 6, -1, 0, 0])
    sentinel = NB * BS
    assert np.asarray(mapping).tolist() == [[4, 9, sentinel, sentinel, sentinel, sentinel]]


def test_groups_share_the_pool_and_the_mask_touches_only_selected_groups():
    table = bt.create(S, NB, MB, BS, num_groups=3)
    table, ok = bt.allocate(table, [0], [8], groups=np.array([True, True, False]))
    assert np.asarray(ok).tolist() == [[True], [True], [False]]
    assert np.asarray(table.num_tokens[:, 0]).tolist() == [8, 8, 0]
    assert rows(table, 0)[0] == [1, 2, 0, 0] and rows(table, 1)[0] == [3, 4, 0, 0]
    mapping = np.asarray(bt.slot_mapping(table, [0], [7]))
    assert mapping.tolist() == [[11], [19], [NB * BS]]
    table = bt.free(table, [0], groups=np.array([False, True, False]))  # purge one group
    assert np.asarray(table.num_tokens[:, 0]).tolist() == [8, 0, 0]
    assert int(bt.num_free_blocks(table)) == NB - 3
    # What the upper group gave back serves another group.
    table, ok = bt.reserve(table, [1], [8], groups=np.array([False, False, True]))
    assert np.asarray(ok).tolist() == [[False], [False], [True]]
    assert rows(table, 2)[1] == [4, 3, 0, 0]


def test_a_request_is_granted_in_every_group_or_in_none():
    table = bt.create(S, 8, MB, BS, num_groups=2)  # 7 usable blocks
    table, ok = bt.allocate(table, [0, 1, 2], [8, 8, 4])  # 4, then 4 (misfit), then 2
    assert np.asarray(ok).tolist() == [[True, False, False], [True, False, False]]
    assert int(table.free_top) == 3 and not np.asarray(table.num_tokens[:, 1:]).any()
    table, ok = bt.reserve(table, [2], [4])  # 2 blocks: fits
    assert np.asarray(ok).tolist() == [[True], [True]] and int(table.free_top) == 1
    assert np.asarray(bt.can_allocate(table, [4, 0])).tolist() == [[False, True], [False, True]]


def test_can_allocate_predicts_allocate():
    table, _ = bt.allocate(bt.create(S, 6, MB, BS), [0], [8])  # 3 blocks left
    fits = bt.can_allocate(table, [4, 9, 4, 0])
    _, ok = bt.allocate(table, [1, 2, 3, -1], [4, 9, 4, 0])
    assert np.asarray(fits).tolist() == [[True, False, False, True]]
    assert np.asarray(ok).tolist()[0][:3] == [True, False, False]


def test_values_never_recompile():
    table = bt.create(S, NB, MB, BS, num_groups=2)
    rng = np.random.default_rng(0)
    for fn in (bt._append_grouped, bt._free, bt._fork, bt._slot_mapping):
        fn.clear_cache()
    for _ in range(20):
        slots = jnp.asarray(rng.integers(-1, S + 1, 3), jnp.int32)
        counts = jnp.asarray(rng.integers(0, 2 * BS, 3), jnp.int32)
        groups = jnp.asarray(rng.integers(0, 2, 2).astype(bool))
        table, _ = bt.allocate(table, slots, counts, groups)
        table, _ = bt.reserve(table, slots, counts, groups, max_new_blocks=1)
        table, _, _ = bt.fork(table, slots, slots[::-1], groups)
        bt.slot_mapping(table, slots, counts)
        table = bt.free(table, slots[:1], groups)
    for fn in (bt._free, bt._fork, bt._slot_mapping):
        assert fn._cache_size() == 1, fn
    assert bt._append_grouped._cache_size() == 2  # allocate; reserve one block wide


def test_table_is_donated():
    table = bt.create(S, NB, MB, BS)
    new, _ = bt.reserve(table, [0], [1])
    assert table.block_ids.is_deleted() and not new.block_ids.is_deleted()


def test_composes_under_jit_and_vmap_over_tables():
    """Several nodes' tables advance in one call, as in the simulator."""
    node_tables = jax.tree.map(lambda *x: jnp.stack(x), *[bt.create(S, NB, MB, BS)] * 2)
    slots = jnp.array([[0, 1], [1, 2]], jnp.int32)
    counts = jnp.array([[5, 3], [4, 0]], jnp.int32)
    step = jax.jit(jax.vmap(lambda t, s, n: bt.reserve(t, s, n)))
    node_tables, ok = step(node_tables, slots, counts)
    for node in range(2):
        alone, alone_ok = bt.reserve(bt.create(S, NB, MB, BS), slots[node], counts[node])
        assert np.array_equal(ok[node], alone_ok)
        assert np.array_equal(node_tables.block_ids[node], alone.block_ids)


def test_from_config_shapes():
    config = EngineConfig(model_preset("tiny"), CacheConfig(block_size=8, num_device_blocks=64,
                                                            num_layer_groups=2),
                          SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32,
                                          max_model_len=100, num_slots=6))
    table = bt.from_config(config)
    assert table.block_ids.shape == (2, 6, 13) and table.ref_counts.shape == (64,)
    assert table.block_size == 8 and table.max_tokens_per_seq == 104


@pytest.mark.parametrize("call, message", [
    (lambda t: bt.allocate(t, [0, 1], [4]), "num_tokens has length 1, expected 2"),
    (lambda t: bt.reserve(t, [[0]], [1]), "slots must be a 1-D integer array"),
    (lambda t: bt.reserve(t, [0], [1.5]), "num_new_tokens must be a 1-D integer array"),
    (lambda t: bt.free(t, [0], groups=[True, False]), r"groups must be bool\[1\]"),
    (lambda t: bt.reserve(t, [0], [1], max_new_blocks=0), "max_new_blocks=0"),
    (lambda t: bt.fork(t, [0], [1, 2]), "dst has length 2, expected 1"),
    (lambda t: bt.reserve(t, [0], [[1], [1]]), r"num_new_tokens must be int\[B\] or int\[1, B\]"),
    (lambda t: bt.reserve(t, [0, 1], [[1]]), "num_new_tokens has length 1, expected 2"),
    (lambda t: bt.adopt(bt.create(S, NB, MB, BS, num_groups=2), [0], [[1, 0, 0, 0]], [1]),
     "2 layer groups; sharing blocks between sequences needs one"),
])
def test_bad_arguments_name_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call(bt.create(S, NB, MB, BS))


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_slots=0), "num_slots=0"), (dict(num_blocks=1), "num_blocks=1"),
    (dict(block_size=2.0), "block_size=2.0"), (dict(num_groups=True), "num_groups=True"),
])
def test_create_validates(kwargs, field):
    args = dict(num_slots=S, num_blocks=NB, max_blocks_per_seq=MB, block_size=BS) | kwargs
    with pytest.raises(ValueError, match=field):
        bt.create(**args)


def test_release_and_retain_ignore_unreferenced_blocks():
    table, _ = bt.allocate(bt.create(S, NB, MB, BS), [0], [4])  # holds block 1
    before = jax.tree.map(np.asarray, table)
    table = bt.release(table, [5, 0, -3, NB])  # 5 is free; the rest are not blocks
    table = bt.retain(table, [5, 0, -3, NB])
    for name in ("ref_counts", "free_stack", "free_top"):
        np.testing.assert_array_equal(getattr(table, name), getattr(before, name), name)


def test_adopted_blocks_are_shared_and_outlive_their_first_holder():
    table, _ = bt.allocate(bt.create(S, NB, MB, BS), [0], [12])  # blocks 1, 2, 3 (full)
    table = bt.retain(table, [1, 2])  # e.g. a cache keeps the first two
    table = bt.free(table, [0])
    assert np.asarray(table.ref_counts[1:4]).tolist() == [1, 1, 0]
    table, ok = bt.adopt(table, [2], [[1, 2, 0, 0]], [2])
    assert np.asarray(ok).tolist() == [[True]] and rows(table)[2] == [1, 2, 0, 0]
    assert int(table.num_tokens[0, 2]) == 2 * BS
    table, ok = bt.adopt(table, [3], [[1, 3, 0, 0]], [2])  # block 3 is free: refused
    assert not np.asarray(ok).any() and int(table.num_tokens[0, 3]) == 0


def test_free_where_frees_exactly_the_masked_slots():
    table, _ = bt.allocate(bt.create(S, NB, MB, BS), [0, 1, 2, 3], [5, 9, 3, 12])
    mask = np.array([True, False, True, True])
    expected = jax.tree.map(np.asarray, bt.free(table, np.flatnonzero(mask)))
    table2, _ = bt.allocate(bt.create(S, NB, MB, BS), [0, 1, 2, 3], [5, 9, 3, 12])
    got = jax.jit(lambda t, m: bt.free_where(t, m, chunk=2))(table2, jnp.asarray(mask))
    for name in ("block_ids", "num_tokens", "ref_counts", "free_top"):
        np.testing.assert_array_equal(getattr(got, name), getattr(expected, name), name)
    top = int(got.free_top)
    assert sorted(np.asarray(got.free_stack[:top]).tolist()) == sorted(
        np.asarray(expected.free_stack[:top]).tolist())
