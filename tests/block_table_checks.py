"""Structural invariants of a block table, checked from a host copy of its arrays."""

import numpy as np

from symphony_jax.memory import block_table as bt


def snapshot(table: bt.BlockTable) -> dict[str, np.ndarray]:
    # Copies: the table's buffers are donated to (and reused by) the next operation.
    return {name: np.array(getattr(table, name), copy=True)
            for name in ("block_ids", "num_tokens", "ref_counts", "free_stack", "free_top")}


def check_structure(table: dict[str, np.ndarray], block_size: int,
                    held_outside=None) -> None:
    """Every block is free or referenced, never both; reference counts equal the references of
    every group's rows plus those ``held_outside`` (int[NB], e.g. a cache's); rows hold distinct
    blocks and nothing past their length, and no two groups share a block; free + used equals
    the pool less the null block, which is never free."""
    num_blocks = table["ref_counts"].shape[-1]
    max_blocks = table["block_ids"].shape[-1]
    references = np.zeros(num_blocks, np.int64)
    owner = np.full(num_blocks, -1)
    for g, (block_ids, tokens) in enumerate(zip(table["block_ids"], table["num_tokens"])):
        live = np.arange(max_blocks)[None, :] < -(-tokens // block_size)[:, None]
        assert (block_ids[~live] == 0).all(), "unused entries point at the null block"
        assert (block_ids[live] > 0).all() and (block_ids[live] < num_blocks).all()
        for row, n in zip(block_ids, live.sum(1)):
            assert len(set(row[:n])) == n, "a row holds a block twice"
        used = np.unique(block_ids[live])
        assert (owner[used] == -1).all(), "two layer groups share a block"
        owner[used] = g
        references += np.bincount(block_ids[live], minlength=num_blocks)
    if held_outside is not None:
        references = references + held_outside
    ref_counts, top = table["ref_counts"], int(table["free_top"])
    np.testing.assert_array_equal(ref_counts, references, "reference counts")
    free = table["free_stack"][:top]
    assert len(set(free.tolist())) == top, "a block is free twice"
    assert 0 not in free, "the null block was freed"
    assert (ref_counts[free] == 0).all(), "a referenced block is free"
    assert top + (ref_counts > 0).sum() == num_blocks - 1, "free + used == capacity"
