"""Paged attention for LLM inference: Pallas kernels for GPU and pure-JAX references.

Layer 0 of symphony-jax: imports ``jax`` only, never ``symphony_jax``.

KV layout (one layer)::

    k_pages, v_pages: [num_kv_heads, num_blocks, block_size, head_dim]

A model stacks its layers in front, ``[layers, num_kv_heads, ...]``, and passes the whole
stack with ``layer=l``: the kernels read layer ``l``'s pages in place, so a layer loop (a
``lax.scan`` carrying the pools) never copies a layer's pool out for the kernel.

A *block* (page) holds ``block_size`` consecutive tokens of one sequence. Head-major, so that
one head's page is a contiguous ``[block_size, head_dim]`` tile: a kernel program, which owns
one KV head, reads whole pages with one gather of rows, and a migration that moves blocks
gathers ``pages[:, block_ids]`` (one contiguous run per head and block). Token ``i`` of a
sequence lives at column ``i // block_size``, offset ``i % block_size`` of its block-table row;
the flat slot ``block * block_size + offset`` indexes ``pages.reshape(num_kv_heads, -1,
head_dim)`` for writes. Block 0 is the null block: unused block-table entries point at it and
its contents are never used unmasked, so kernels read it instead of any page a sequence does
not own.

Entry points: ``paged_decode_attention`` (one query token per sequence, split-K) and
``paged_prefill_attention`` (ragged batches of prompts, chunks and decode tokens), each with
``impl="auto" | "pallas" | "interpret" | "reference"``.
"""

from pallas_kernels.attention import IMPLS, paged_decode_attention, paged_prefill_attention

__all__ = ["IMPLS", "paged_decode_attention", "paged_prefill_attention"]
