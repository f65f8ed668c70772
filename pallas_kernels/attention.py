"""Public entry points: one per kernel, choosing the implementation.

``impl`` is ``"auto"`` (the Pallas kernel on GPU, the reference elsewhere), ``"pallas"``
(GPU only), ``"interpret"`` (the Pallas kernel run by the interpreter, on any backend: slow,
for tests) or ``"reference"``. Tuning keywords reach the Pallas kernels only.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from pallas_kernels import args, decode, prefill, reference

IMPLS = ("auto", "pallas", "interpret", "reference")
log = logging.getLogger("pallas_kernels")


def _resolve(op: str, impl: str, head_dim: int, block_size: int) -> str:
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl={impl!r}, expected one of {', '.join(IMPLS)}")
    backend = jax.default_backend()
    chosen = ("pallas" if backend == "gpu" else "reference") if impl == "auto" else impl
    if chosen == "pallas" and backend != "gpu":
        raise ValueError(f"{op}: impl='pallas' needs a GPU (backend is {backend}); use "
                         "'interpret' to run the kernel here")
    if chosen in ("pallas", "interpret"):
        for name, value, minimum in (("head_dim", head_dim, 16), ("block_size", block_size, 1)):
            if value & (value - 1) or value < minimum:
                raise ValueError(f"{op}: the Pallas kernel tiles on {name}, which must be a "
                                 f"power of two >= {minimum}, got {value}; use "
                                 "impl='reference'")
    log.debug("%s: impl=%s (requested %s, backend %s)", op, chosen, impl, backend)
    return chosen


def _stacked(k_pages, v_pages, layer):
    """The pools with a layer axis, and the layer to read as an int32 scalar."""
    if layer is None:
        return k_pages[None], v_pages[None], jnp.int32(0)
    return k_pages, v_pages, jnp.asarray(layer, jnp.int32)


def paged_decode_attention(q, k_pages, v_pages, block_tables, lengths, *, sm_scale: float,
                           layer=None, impl: str = "auto", **tuning) -> jax.Array:
    """Attention of one new token per sequence over its paged K/V.

    q: [B, num_heads, head_dim]; k_pages, v_pages: one layer's pools [num_kv_heads,
    num_blocks, block_size, head_dim] (see the package docstring), or pools stacked over layers
    [layers, ...] with ``layer`` (an int or traced int32 scalar) naming the one to read;
    block_tables: int[B, max_blocks]; lengths: int[B], cached tokens of each sequence including
    the new one (0 gives zeros). ``sm_scale`` multiplies the logits (usually
    ``head_dim ** -0.5``). Tuning (Pallas only): ``num_splits``, ``pages_per_block``,
    ``num_warps``, ``num_stages``. Returns [B, num_heads, head_dim] in q's dtype.
    """
    args.check_decode(q, k_pages, v_pages, block_tables, lengths, layer)
    chosen = _resolve("paged_decode_attention", impl, q.shape[-1], k_pages.shape[-2])
    k_pages, v_pages, layer = _stacked(k_pages, v_pages, layer)
    if chosen == "reference":
        return reference.paged_decode_attention(q, k_pages, v_pages, block_tables, lengths,
                                                layer, sm_scale=sm_scale)
    return decode.paged_decode_attention(q, k_pages, v_pages, block_tables, lengths, layer,
                                         sm_scale=sm_scale, interpret=chosen == "interpret",
                                         **tuning)


def paged_prefill_attention(q, k_pages, v_pages, block_tables, context_lens, query_start_loc,
                            *, sm_scale: float, layer=None, impl: str = "auto",
                            **tuning) -> jax.Array:
    """Causal attention of a ragged batch of query tokens over their sequences' paged K/V.

    q: [T, num_heads, head_dim], sequence s owning tokens
    ``query_start_loc[s]:query_start_loc[s + 1]`` (int[S + 1]), the last of its
    ``context_lens[s]`` (int[S]) cached tokens: their K/V are already in the pool. Prompts,
    chunks at any offset and decode tokens mix freely; tokens past ``query_start_loc[S]`` are
    padding and give zeros. Pools, ``layer`` and block tables as in
    ``paged_decode_attention``. Tuning (Pallas only): ``rows_per_block``, ``pages_per_block``,
    ``num_warps``, ``num_stages``. Returns [T, num_heads, head_dim] in q's dtype.
    """
    args.check_prefill(q, k_pages, v_pages, block_tables, context_lens, query_start_loc, layer)
    chosen = _resolve("paged_prefill_attention", impl, q.shape[-1], k_pages.shape[-2])
    k_pages, v_pages, layer = _stacked(k_pages, v_pages, layer)
    if chosen == "reference":
        return reference.paged_prefill_attention(q, k_pages, v_pages, block_tables,
                                                 context_lens, query_start_loc, layer,
                                                 sm_scale=sm_scale)
    return prefill.paged_prefill_attention(q, k_pages, v_pages, block_tables, context_lens,
                                           query_start_loc, layer, sm_scale=sm_scale,
                                           interpret=chosen == "interpret", **tuning)
