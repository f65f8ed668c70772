"""The block table driven by random operations, against the plain-Python allocator.

After every step: the structural invariants of the block table hold, and the
table agrees with the model (ok flags, token counts, free counts, and block ids up to a
renaming: the same entries share a block in both).
"""

import hypothesis.strategies as st
import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from symphony_jax.memory import block_table as bt
from block_table_checks import check_structure, snapshot
from symphony_jax.memory.py_allocator import PyBlockAllocator

S, NB, MB, BS = 6, 14, 4, 4  # tight: 13 usable blocks, 6 slots of up to 4 blocks
B, T = 4, 8  # batch of requests, tokens in a slot-mapping query

slot_lists = st.lists(st.integers(-1, S + 1), min_size=B, max_size=B)
token_lists = st.lists(st.integers(-1, MB * BS + 2), min_size=B, max_size=B)
small_token_lists = st.lists(st.integers(-1, 2 * BS), min_size=B, max_size=B)


class BlockTableMachine(RuleBasedStateMachine):
    num_groups = 1

    def __init__(self):
        super().__init__()
        self.table = bt.create(S, NB, MB, BS, num_groups=self.num_groups)
        self.model = PyBlockAllocator(S, NB, MB, BS, num_groups=self.num_groups)
        self.held: list[int] = []  # model blocks held outside slots
        self.renaming: dict[int, int] = {}  # model block -> table block

    def table_ids(self, model_blocks) -> list[int]:
        renaming = self.block_renaming()
        return [renaming[b] for b in model_blocks]

    def draw_groups(self, data):
        if self.num_groups == 1:
            return None, [True]
        mask = data.draw(st.lists(st.booleans(), min_size=self.num_groups,
                                  max_size=self.num_groups))
        return np.array(mask), mask

    def per_group(self, active, flags) -> list[list[bool]]:
        """A request's flag in each group it asked for."""
        return [[f and on for f in flags] for on in active]

    def check_failures_change_nothing(self, before, after, granted, slots):
        if not any(granted):
            for name in before:
                np.testing.assert_array_equal(before[name], after[name], name)
        failed = sorted({s for s in slots if 0 <= s < S}
                        - {s for s, ok in zip(slots, granted) if ok})
        np.testing.assert_array_equal(before["block_ids"][:, failed],
                                      after["block_ids"][:, failed])
        np.testing.assert_array_equal(before["num_tokens"][:, failed],
                                      after["num_tokens"][:, failed])

    @rule(data=st.data(), slots=slot_lists, num_tokens=token_lists)
    def allocate(self, data, slots, num_tokens):
        groups, active = self.draw_groups(data)
        before = snapshot(self.table)
        self.table, ok = bt.allocate(self.table, slots, num_tokens, groups)
        expected = self.model.allocate(slots, num_tokens, groups=active)
        assert np.asarray(ok).tolist() == self.per_group(active, expected)
        self.check_failures_change_nothing(before, snapshot(self.table), expected, slots)

    @rule(data=st.data(), slots=slot_lists, num_new=small_token_lists,
          max_new_blocks=st.sampled_from([None, 1]))
    def reserve(self, data, slots, num_new, max_new_blocks):
        """Tokens the same in every group, or (sometimes) drawn per group."""
        groups, active = self.draw_groups(data)
        if self.num_groups > 1 and data.draw(st.booleans()):
            num_new = [num_new] + [data.draw(small_token_lists) for _ in range(1, self.num_groups)]
        before = snapshot(self.table)
        self.table, ok = bt.reserve(self.table, slots, num_new, groups,
                                    max_new_blocks=max_new_blocks)
        expected = self.model.reserve(slots, num_new, max_new_blocks, groups=active)
        assert np.asarray(ok).tolist() == self.per_group(active, expected)
        self.check_failures_change_nothing(before, snapshot(self.table), expected, slots)

    def draw_slots(self, data, preferred: list[int]) -> list[int]:
        """B slots, mostly from ``preferred``, some anywhere (padding and repeats included)."""
        likely = st.sampled_from(preferred) if preferred else st.integers(0, S - 1)
        return data.draw(st.lists(st.one_of(likely, likely, likely, st.integers(-1, S + 1)),
                                  min_size=B, max_size=B))

    @rule(data=st.data())
    def fork(self, data):
        occupied = [s for s in range(S) if any(t[s] for t in self.model.tokens)]
        src = self.draw_slots(data, occupied)
        dst = self.draw_slots(data, self.empty_slots())
        groups, active = self.draw_groups(data)
        self.table, ok, copies = bt.fork(self.table, src, dst, groups)
        expected_ok, expected_copies = self.model.fork(src, dst, groups=active)
        assert np.asarray(ok).tolist() == self.per_group(active, expected_ok)
        table = snapshot(self.table)
        for g in range(self.num_groups):
            copy_src, copy_dst = np.asarray(copies.src[g]), np.asarray(copies.dst[g])
            copied = copy_dst != NB
            assert copied.sum() == sum(c[0] == g for c in expected_copies)
            assert (copy_src[~copied] == 0).all()
            # Each copy reads the source's last block and writes the child's last block.
            for b in np.flatnonzero(copied):
                last = table["num_tokens"][g, dst[b]] // BS
                assert copy_dst[b] == table["block_ids"][g, dst[b], last]
                assert copy_src[b] == table["block_ids"][g, src[b], last]

    @rule(data=st.data(), slots=slot_lists)
    def free(self, data, slots):
        groups, active = self.draw_groups(data)
        self.table = bt.free(self.table, slots, groups)
        self.model.free(slots, groups=active)

    def empty_slots(self) -> list[int]:
        return [s for s in range(S) if all(t[s] == 0 for t in self.model.tokens)]

    @precondition(lambda self: self.model.num_free_blocks < MB and self.empty_slots())
    @rule(data=st.data())
    def allocate_beyond_free_blocks_changes_nothing(self, data):
        slot = data.draw(st.sampled_from(self.empty_slots()))
        too_many = (self.model.num_free_blocks // self.num_groups + 1) * BS
        before = snapshot(self.table)
        self.table, ok = bt.allocate(self.table, [slot], [too_many])
        assert not np.asarray(ok).any()
        after = snapshot(self.table)
        for name in before:
            np.testing.assert_array_equal(before[name], after[name], name)

    @rule(slots=st.lists(st.integers(-1, S), min_size=T, max_size=T),
          positions=st.lists(st.integers(-1, MB * BS), min_size=T, max_size=T))
    def slot_mapping_matches_model(self, slots, positions):
        mapping = np.asarray(bt.slot_mapping(self.table, slots, positions))
        renaming = self.block_renaming()
        for g, expected in enumerate(self.model.slot_mapping(slots, positions)):
            assert mapping[g].tolist() == [
                m if m == NB * BS else renaming[m // BS] * BS + m % BS for m in expected]

    def block_renaming(self) -> dict[int, int]:
        """Model block -> table block, for every referenced block; asserts it is one-to-one.
        Blocks held only outside slots keep the name they had in a row."""
        table = snapshot(self.table)
        forward = {mb: block for mb, block in self.renaming.items()
                   if self.model.ref_counts[mb] > 0}
        for g, rows in enumerate(self.model.blocks):
            for slot, row in enumerate(rows):
                for col, model_block in enumerate(row):
                    block = int(table["block_ids"][g, slot, col])
                    assert forward.setdefault(model_block, block) == block
        assert len(set(forward.values())) == len(forward), "two model blocks share a table block"
        self.renaming = forward
        return forward

    @rule(data=st.data())
    def retain_live_blocks(self, data):
        live = sorted({b for rows in self.model.blocks for row in rows for b in row})
        if not live:
            return
        picks = data.draw(st.lists(st.sampled_from(live), min_size=1, max_size=B, unique=True))
        ids = self.table_ids(picks)
        self.table = bt.retain(self.table, ids + [0] * (B - len(ids)))
        self.model.retain(picks)
        self.held += picks

    @rule(data=st.data())
    def release_held_blocks(self, data):
        if not self.held:
            return
        picks = data.draw(st.lists(st.integers(0, len(self.held) - 1), min_size=1,
                                   max_size=min(B, len(self.held)), unique=True))
        blocks = [self.held[i] for i in picks]
        ids = self.table_ids(blocks)
        self.table = bt.release(self.table, ids + [-1] * (B - len(ids)))
        self.model.release(blocks)
        for i in sorted(picks, reverse=True):
            del self.held[i]

    @precondition(lambda self: self.num_groups == 1)
    @rule(data=st.data())
    def adopt_held_or_live_blocks(self, data):
        model = self.model
        referenced = sorted({b for row in model.blocks[0] for b in row} | set(self.held))
        empty = [s for s in range(S) if model.tokens[0][s] == 0]
        if not referenced or not empty:
            return
        slot = data.draw(st.sampled_from(empty))
        row = data.draw(st.lists(st.sampled_from(referenced), max_size=MB, unique=True))
        ids = self.table_ids(row) + [0] * (MB - len(row))
        self.table, ok = bt.adopt(self.table, [slot], [ids], [len(row)])
        expected = model.adopt([slot], [row + [0] * (MB - len(row))], [len(row)])
        assert bool(np.asarray(ok)[0, 0]) == expected[0]

    @invariant()
    def structure_holds(self):
        renaming = self.block_renaming()
        held = np.zeros(NB, np.int64)
        for b in self.held:
            held[renaming[b]] += 1
        check_structure(snapshot(self.table), BS, held)

    @invariant()
    def agrees_with_model(self):
        table = snapshot(self.table)
        assert int(table["free_top"]) == self.model.num_free_blocks
        assert table["num_tokens"].tolist() == self.model.tokens
        self.block_renaming()

    def teardown(self):
        """Releasing every held block and freeing every slot restores the initial state (up to
        the order of the free stack)."""
        for block in self.table_ids(self.held):
            self.table = bt.release(self.table, [block])
        self.table = bt.free(self.table, np.arange(S))
        table = snapshot(self.table)
        assert int(table["free_top"]) == NB - 1
        assert sorted(table["free_stack"][: NB - 1].tolist()) == list(range(1, NB))
        assert not table["block_ids"].any() and not table["num_tokens"].any()
        assert not table["ref_counts"].any()


class MultiGroupBlockTableMachine(BlockTableMachine):
    """Three layer groups sharing the pool; every operation asks for a random subset of them."""

    num_groups = 3


STEPS = settings(max_examples=8, stateful_step_count=200,
                 suppress_health_check=[HealthCheck.large_base_example, HealthCheck.too_slow])
TestBlockTable = BlockTableMachine.TestCase
TestBlockTable.settings = STEPS
TestMultiGroupBlockTable = MultiGroupBlockTableMachine.TestCase
TestMultiGroupBlockTable.settings = STEPS
