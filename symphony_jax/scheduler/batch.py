"""A step's batch: the shape bucket that holds a plan, and the plan's layout for the model.

Batch arrays are padded to buckets so that the model compiles for few shapes: a count is
rounded up to a power of two, capped at its limit (``max_num_seqs`` sequences,
``max_num_batched_tokens`` tokens). The host reads the plan's two counts to pick the bucket.
"""

from __future__ import annotations

import functools

import jax

from symphony_jax.config import SchedulerConfig
from symphony_jax.memory import block_table as bt
from symphony_jax.memory import layout as layout_lib
from symphony_jax.scheduler.step import StepPlan


def bucket(count: int, limit: int) -> int:
    """The smallest power of two >= ``count`` (at least 1), at most ``limit``."""
    return min(1 << max(count - 1, 0).bit_length(), limit)


def buckets(num_seqs: int, num_tokens: int, limits: SchedulerConfig) -> tuple[int, int]:
    """The (sequences, tokens) bucket of a plan with these counts."""
    return (bucket(num_seqs, limits.max_num_seqs),
            bucket(num_tokens, limits.max_num_batched_tokens))


@functools.partial(jax.jit, static_argnames=("num_seqs", "num_tokens"))
def layout(table: bt.BlockTable, plan: StepPlan, num_seqs: int,
           num_tokens: int) -> layout_lib.BatchLayout:
    """The layout of ``plan``'s batch in a (``num_seqs``, ``num_tokens``) bucket; ``table`` is
    the block table that ``schedule`` returned with the plan (the step's tokens reserved)."""
    seq_slots = plan.order[:num_seqs]
    query_lens = plan.query_lens.at[seq_slots].get(mode="fill", fill_value=0)
    return layout_lib.build(table, seq_slots, query_lens, num_tokens)
