"""The layout of one forward step: where each token of a ragged batch sits.

A step runs B sequences (block-table slots), each with a run of new query tokens: a whole
prompt, a prefill chunk, or one decode token. Their T tokens are laid out flat, sequence after
sequence; the model needs, besides the token ids, each token's position and KV slot, each
sequence's block-table row and context length, and where each sequence's last token is (the one
whose logits are sampled). ``build`` derives all of it from the block table *after* the step's
tokens were reserved in it, padded to fixed sizes B and T so that shapes stay few.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from symphony_jax.memory import block_table as bt

i32 = jnp.int32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """One step's batch (B sequences, T tokens, G layer groups, MB table columns)."""

    seq_slots: jax.Array  # i32[B]        block-table slot of each sequence; padding: num_slots
    query_start_loc: jax.Array  # i32[B + 1]  sequence b owns tokens [qsl[b], qsl[b + 1])
    context_lens: jax.Array  # i32[B]     cached tokens including this step's (padding: 0)
    token_slots: jax.Array  # i32[T]      slot of each token's sequence; padding: num_slots
    positions: jax.Array  # i32[T]        position of each token in its sequence (padding: 0)
    slot_mapping: jax.Array  # i32[G, T]  flat KV slot of each token; padding: out of range
    block_tables: jax.Array  # i32[G, B, MB]  each sequence's table row (padding: null block)
    logits_indices: jax.Array  # i32[B]   flat index of each sequence's last token

    @property
    def num_seqs(self) -> int:
        return self.seq_slots.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]


@functools.partial(jax.jit, static_argnames="num_tokens")
def build(table: bt.BlockTable, seq_slots: jax.Array, query_lens: jax.Array,
          num_tokens: int) -> BatchLayout:
    """The layout of sequences ``seq_slots`` (i32[B]) running ``query_lens`` (i32[B]) new tokens
    each, their last ones, in ``num_tokens`` (static T >= sum of query_lens) flat tokens.

    The block table must already hold the new tokens (``block_table.reserve``): a sequence's
    context length is its slot's token count (in group 0: a running sequence is resident in
    every group). Sequences with no query tokens, or outside the table, are padding.
    """
    S = table.num_slots
    valid = (seq_slots >= 0) & (seq_slots < S) & (query_lens > 0)
    seq_slots = jnp.where(valid, seq_slots, S)
    query_lens = jnp.where(valid, query_lens, 0).astype(i32)
    context_lens = table.num_tokens[0].at[seq_slots].get(mode="fill", fill_value=0)
    ends = jnp.cumsum(query_lens, dtype=i32)
    starts = ends - query_lens
    token = jnp.arange(num_tokens, dtype=i32)
    seq = jnp.minimum(jnp.searchsorted(ends, token, side="right"), seq_slots.shape[0] - 1)
    in_batch = token < ends[-1]
    token_slots = jnp.where(in_batch, seq_slots[seq], S)
    positions = jnp.where(in_batch, context_lens[seq] - query_lens[seq] + token - starts[seq], 0)
    return BatchLayout(
        seq_slots=seq_slots,
        query_start_loc=jnp.concatenate([jnp.zeros(1, i32), ends]),
        context_lens=context_lens,
        token_slots=token_slots,
        positions=positions,
        slot_mapping=bt.slot_mapping(table, token_slots, positions),
        block_tables=table.block_ids.at[:, seq_slots].get(mode="fill", fill_value=0),
        logits_indices=jnp.maximum(ends - 1, 0),
    )
