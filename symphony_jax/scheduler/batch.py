"""A step's batch: the shape bucket that holds a plan, and the plan's layout for the model.

Batch arrays are padded to buckets so that the model compiles for few shapes: a count is
rounded up to a power of two, capped at its limit (``max_num_seqs`` sequences,
``max_num_batched_tokens`` tokens). The host reads the plan's counts to pick the bucket.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from symphony_jax.config import SchedulerConfig
from symphony_jax.memory import block_table as bt
from symphony_jax.memory import layout as layout_lib
from symphony_jax.scheduler.step import StepPlan

SMALLEST_TOKEN_BUCKET = 16  # prefill steps below this many tokens share one shape


def bucket(count: int, limit: int, smallest: int = 1) -> int:
    """The smallest power of two >= ``count`` and ``smallest``, at most ``limit``."""
    return min(1 << (max(count, smallest, 1) - 1).bit_length(), limit)


def padded(values, limit: int, fill: int) -> np.ndarray:
    """``values`` as ``i32`` padded with ``fill`` to their ``bucket`` (at most ``limit``): a
    batch of slots for a jitted transition, compiled for few sizes."""
    out = np.full(bucket(len(values), limit), fill, np.int32)
    out[: len(values)] = values
    return out


def shape(num_seqs: int, num_tokens: int, decode_only: bool,
          limits: SchedulerConfig) -> tuple[int, int]:
    """The (sequences, tokens) bucket of a plan with these counts. A decode-only step has one
    token per sequence; otherwise the tokens bucket holds at least one per sequence."""
    seqs = bucket(num_seqs, limits.max_num_seqs)
    if decode_only:
        return seqs, seqs
    return seqs, bucket(max(num_tokens, seqs), limits.max_num_batched_tokens,
                        SMALLEST_TOKEN_BUCKET)


@functools.partial(jax.jit, static_argnames=("num_seqs", "num_tokens"))
def layout(table: bt.BlockTable, plan: StepPlan, num_seqs: int,
           num_tokens: int) -> layout_lib.BatchLayout:
    """The layout of ``plan``'s batch in a (``num_seqs``, ``num_tokens``) bucket; ``table`` is
    the block table that ``schedule`` returned with the plan (the step's tokens reserved)."""
    seq_slots = plan.order[:num_seqs]
    query_lens = plan.query_lens.at[seq_slots].get(mode="fill", fill_value=0)
    return layout_lib.build(table, seq_slots, query_lens, num_tokens)
