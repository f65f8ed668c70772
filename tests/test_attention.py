"""Paged attention: kernel (interpret mode) == reference == dense attention on contiguous K/V."""

import contextlib
import functools
import logging

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import pallas_kernels as pk
from pallas_kernels import decode, prefill
from attention_cases import TOLERANCE, dense_attention, geometries, make_case

IMPLS = ["reference", "interpret"]


def assert_close(actual, expected, dtype):
    actual = np.asarray(jnp.asarray(actual).astype(jnp.float32), np.float64)
    assert np.isfinite(actual).all(), "NaN or inf leaked into the output"
    np.testing.assert_allclose(actual, expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def decode_case(rng, lengths, geometry, max_blocks, share=0):
    g = geometry
    case = make_case(rng, lengths, num_kv_heads=g["num_kv_heads"], head_dim=g["head_dim"],
                     block_size=g["block_size"], max_blocks=max_blocks, dtype=g["dtype"],
                     share_first_pages=share)
    num_heads = g["num_kv_heads"] * g["group"]
    q = jnp.asarray(rng.normal(size=(len(lengths), num_heads, g["head_dim"])), g["dtype"])
    scale = g["head_dim"] ** -0.5
    q64 = np.asarray(q.astype(jnp.float32), np.float64)
    expected = np.concatenate([
        dense_attention(q64[b:b + 1], case.keys[b], case.values[b], [n - 1], scale)
        for b, n in enumerate(lengths)])
    args = (q, jnp.asarray(case.k_pages, g["dtype"]), jnp.asarray(case.v_pages, g["dtype"]),
            jnp.asarray(case.block_tables), jnp.asarray(case.lengths))
    return args, scale, expected


@st.composite
def decode_problems(draw):
    geometry = draw(geometries)
    max_blocks = draw(st.integers(1, 5))
    capacity = max_blocks * geometry["block_size"]
    special = st.sampled_from([1, geometry["block_size"], capacity, 0])  # edges
    lengths = draw(st.lists(st.one_of(special, st.integers(0, capacity)), min_size=1,
                            max_size=3))
    return geometry, max_blocks, lengths, draw(st.integers(0, 2)), draw(st.integers(0, 2**31))


@settings(max_examples=12)
@given(problem=decode_problems(), num_splits=st.sampled_from([None, 1, 2, 3]),
       smallest_blocks=st.booleans())
def test_decode_matches_dense_attention(problem, num_splits, smallest_blocks):
    geometry, max_blocks, lengths, share, seed = problem
    args, scale, expected = decode_case(np.random.default_rng(seed), lengths, geometry,
                                        max_blocks, share)
    # Compute blocks of 16 tokens, the Triton minimum, give the most blocks to split over.
    pages_per_block = max(1, 16 // geometry["block_size"]) if smallest_blocks else None
    assert_close(pk.paged_decode_attention(*args, sm_scale=scale, impl="reference"),
                 expected, geometry["dtype"])
    assert_close(pk.paged_decode_attention(*args, sm_scale=scale, impl="interpret",
                                           num_splits=num_splits,
                                           pages_per_block=pages_per_block),
                 expected, geometry["dtype"])


FIXED = dict(num_kv_heads=2, group=4, head_dim=64, block_size=16, dtype=jnp.float32)


@pytest.mark.parametrize("num_splits", [2, 5])
def test_split_k_merges_long_contexts(num_splits):
    """Sequences spanning many splits, with a peaked softmax (split maxima far apart), merge
    to the one-pass result."""
    rng = np.random.default_rng(5)
    lengths = [160, 37, 0, 100]
    case = make_case(rng, lengths, num_kv_heads=2, head_dim=64, block_size=8, max_blocks=20,
                     dtype=jnp.float32)
    q = jnp.asarray(4.0 * rng.normal(size=(4, 8, 64)), jnp.float32)
    q64 = np.asarray(q, np.float64)
    expected = np.concatenate([dense_attention(q64[b:b + 1], case.keys[b], case.values[b],
                                               [n - 1], 0.125) for b, n in enumerate(lengths)])
    out = pk.paged_decode_attention(q, jnp.asarray(case.k_pages, jnp.float32),
                                    jnp.asarray(case.v_pages, jnp.float32),
                                    jnp.asarray(case.block_tables), jnp.asarray(case.lengths),
                                    sm_scale=0.125, impl="interpret", num_splits=num_splits,
                                    pages_per_block=2)
    assert_close(out, expected, jnp.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_length_gives_zeros(impl):
    args, scale, _ = decode_case(np.random.default_rng(0), [0, 5, 0], FIXED, max_blocks=2)
    out = np.asarray(pk.paged_decode_attention(*args, sm_scale=scale, impl=impl))
    assert np.isfinite(out).all() and not out[[0, 2]].any() and out[1].any()


@pytest.mark.parametrize("impl", IMPLS)
def test_chunked_prefill_then_decode_equals_one_prompt(impl):
    """A prompt attended in chunks at their offsets (then one decode token) equals the
    whole prompt attended at once."""
    rng = np.random.default_rng(1)
    n = 40
    case = make_case(rng, [n], num_kv_heads=2, head_dim=64, block_size=8, max_blocks=5,
                     dtype=jnp.float32)
    q = jnp.asarray(rng.normal(size=(n, 8, 64)), jnp.float32)
    pools = (jnp.asarray(case.k_pages, jnp.float32), jnp.asarray(case.v_pages, jnp.float32),
             jnp.asarray(case.block_tables))
    attend = functools.partial(pk.paged_prefill_attention, sm_scale=0.125, impl=impl)
    whole = attend(q, *pools, jnp.array([n]), jnp.array([0, n]))
    pieces = [attend(q[a:b], *pools, jnp.array([b]), jnp.array([0, b - a]))
              for a, b in [(0, 13), (13, 29), (29, 39)]]
    last = pk.paged_decode_attention(q[39:], *pools, jnp.array([n]), sm_scale=0.125, impl=impl)
    np.testing.assert_allclose(np.concatenate(pieces + [last]), whole, atol=1e-5, rtol=1e-5)


def test_traced_query_run_longer_than_context_gives_zeros_not_nan():
    """Under jit values are not checked: a sequence claiming more query tokens than context
    gets zeros for the tokens that would sit before position 0, and the others are unharmed."""
    rng = np.random.default_rng(6)
    case = make_case(rng, [6, 20], num_kv_heads=2, head_dim=64, block_size=16, max_blocks=2,
                     dtype=jnp.float32)
    q = jnp.asarray(rng.normal(size=(12, 8, 64)), jnp.float32)
    pools = (jnp.asarray(case.k_pages), jnp.asarray(case.v_pages), jnp.asarray(case.block_tables))
    contexts, starts = jnp.array([6, 20]), jnp.array([0, 8, 12])  # 8 queries over 6 tokens
    expected = dense_attention(np.asarray(q[8:], np.float64), case.keys[1], case.values[1],
                               np.arange(16, 20), 0.125)
    for impl in IMPLS:
        attend = jax.jit(functools.partial(pk.paged_prefill_attention, sm_scale=0.125,
                                           impl=impl))
        out = np.asarray(attend(q, *pools, contexts, starts))
        assert np.isfinite(out).all() and not out[:2].any(), impl
        np.testing.assert_allclose(out[8:], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_stacked_pools_read_the_named_layer(impl):
    """Pools stacked over layers, with a traced layer index, read that layer in place."""
    args, scale, expected = decode_case(np.random.default_rng(7), [9, 30], FIXED, max_blocks=2)
    q, k, v, tables, lengths = args
    stack = lambda pages: jnp.stack([jnp.full_like(pages, jnp.nan), pages, -pages])
    attend = jax.jit(lambda layer: pk.paged_decode_attention(
        q, stack(k), stack(v), tables, lengths, sm_scale=scale, layer=layer, impl=impl))
    assert_close(attend(1), expected, jnp.float32)
    prefill_out = pk.paged_prefill_attention(q, stack(k), stack(v), tables, lengths,
                                             jnp.arange(3, dtype=jnp.int32), sm_scale=scale,
                                             layer=1, impl=impl)
    assert_close(prefill_out, expected, jnp.float32)


def test_layer_goes_with_stacked_pools():
    with pytest.raises(ValueError, match="pass layer= exactly when the pools are stacked"):
        pk.paged_decode_attention(**bad(), sm_scale=1.0, layer=0, impl="reference")
    stacked = bad(k_pages=jnp.zeros((3, 2, 9, 16, 64)), v_pages=jnp.zeros((3, 2, 9, 16, 64)))
    with pytest.raises(ValueError, match="pass layer= exactly when the pools are stacked"):
        pk.paged_decode_attention(**stacked, sm_scale=1.0, impl="reference")
    with pytest.raises(ValueError, match="layer=3 is outside the 3 stacked layers"):
        pk.paged_decode_attention(**stacked, sm_scale=1.0, layer=3, impl="reference")


def test_jitted_with_traced_lengths():
    args, scale, expected = decode_case(np.random.default_rng(2), [7, 33], FIXED, max_blocks=3)
    attend = jax.jit(functools.partial(pk.paged_decode_attention, sm_scale=scale,
                                       impl="interpret"))
    assert_close(attend(*args), expected, jnp.float32)


def test_auto_picks_the_reference_off_gpu_and_says_so(caplog):
    args, scale, expected = decode_case(np.random.default_rng(3), [3], FIXED, max_blocks=1)
    with caplog.at_level(logging.DEBUG, logger="pallas_kernels"):
        assert_close(pk.paged_decode_attention(*args, sm_scale=scale), expected, jnp.float32)
    backend = jax.default_backend()
    assert f"impl={'pallas' if backend == 'gpu' else 'reference'}" in caplog.text


def bad(**changes):
    """Valid decode arguments (q, k, v, tables, lengths) with some replaced."""
    base = dict(q=jnp.zeros((2, 8, 64)), k_pages=jnp.zeros((2, 9, 16, 64)),
                v_pages=jnp.zeros((2, 9, 16, 64)), block_tables=jnp.zeros((2, 4), jnp.int32),
                lengths=jnp.array([3, 64], jnp.int32))
    return base | changes


@pytest.mark.parametrize("kwargs, message", [
    (bad(q=jnp.zeros((2, 8))), r"q must be \[tokens, num_heads, head_dim\]"),
    (bad(v_pages=jnp.zeros((2, 9, 8, 64))), "v_pages has shape"),
    (bad(q=jnp.zeros((2, 8, 32))), "q has head_dim 32, the pools 64"),
    (bad(q=jnp.zeros((2, 7, 64))), "7 query heads are not a multiple of 2 KV heads"),
    (bad(k_pages=jnp.zeros((2, 9, 16, 64), jnp.bfloat16)), "must share one of"),
    (bad(q=jnp.zeros((2, 8, 64), jnp.int32)), "must share one of"),
    (bad(block_tables=jnp.zeros((3, 4), jnp.int32)), "block_tables has 3 rows, expected 2"),
    (bad(block_tables=jnp.zeros((2, 4))), "block_tables must be a 2-D integer array"),
    (bad(lengths=jnp.array([3, 65], jnp.int32)), r"lengths must lie in \[0, 64\]"),
    (bad(lengths=jnp.array([3], jnp.int32)), "lengths has length 1, expected 2"),
])
def test_decode_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pk.paged_decode_attention(**kwargs, sm_scale=1.0, impl="reference")


@pytest.mark.parametrize("context_lens, starts, message", [
    ([4, 4], [0, 2], r"query_start_loc has length 2, expected 3"),
    ([4, 4], [0, 3, 2], "query_start_loc must rise"),
    ([4, 4], [0, 2, 9], "query_start_loc must rise from >= 0 to <= 6"),
    ([2, 4], [0, 3, 5], "more query tokens than context"),
    ([4, 80], [0, 2, 5], r"context_lens must lie in \[0, 64\]"),
])
def test_prefill_rejects_bad_arguments(context_lens, starts, message):
    args = bad(q=jnp.zeros((6, 8, 64)))
    with pytest.raises(ValueError, match=message):
        pk.paged_prefill_attention(args["q"], args["k_pages"], args["v_pages"],
                                   args["block_tables"], jnp.array(context_lens),
                                   jnp.array(starts), sm_scale=1.0, impl="reference")


def test_impl_choice_is_checked():
    with pytest.raises(ValueError, match="impl='cuda', expected one of auto, pallas"):
        pk.paged_decode_attention(**bad(), sm_scale=1.0, impl="cuda")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="impl='pallas' needs a GPU"):
            pk.paged_decode_attention(**bad(), sm_scale=1.0, impl="pallas")
    with pytest.raises(ValueError, match="head_dim, which must be a power of two >= 16, got 48"):
        pk.paged_decode_attention(**bad(q=jnp.zeros((2, 8, 48)), k_pages=jnp.zeros((2, 9, 16, 48)),
                                        v_pages=jnp.zeros((2, 9, 16, 48))),
                                  sm_scale=1.0, impl="interpret")


# ---------------------------------------------------------------------------------------------
# GPU: lowering checked from any machine; compiled kernels where a GPU is present.


def target_gpu():
    """Lowering for CUDA from a machine without a GPU: JAX >= 0.11 asks which GPU."""
    if jax.default_backend() == "gpu" or not hasattr(jax.sharding, "AbstractDevice"):
        return contextlib.nullcontext()
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=132,
                                         platform="gpu")
    return jax.sharding.use_abstract_mesh(
        jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device))


LLAMA_8B = dict(num_kv_heads=8, group=4, head_dim=128, block_size=16)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_kernels_lower_for_cuda_through_triton(dtype):
    heads, kv_heads, dim, bs = 32, 8, 128, 16
    q = jax.ShapeDtypeStruct((4, heads, dim), dtype)
    pool = jax.ShapeDtypeStruct((2, kv_heads, 64, bs, dim), dtype)  # two layers stacked
    tables = jax.ShapeDtypeStruct((4, 8), jnp.int32)
    ints = lambda n: jax.ShapeDtypeStruct((n,), jnp.int32)
    layer = jax.ShapeDtypeStruct((), jnp.int32)
    decode_fn = functools.partial(decode.paged_decode_attention, sm_scale=dim**-0.5)
    prefill_fn = functools.partial(prefill.paged_prefill_attention, sm_scale=dim**-0.5)
    with target_gpu():
        for fn, args in ((decode_fn, (q, pool, pool, tables, ints(4), layer)),
                         (prefill_fn, (q, pool, pool, tables, ints(4), ints(5), layer))):
            text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
            assert "triton" in text, fn


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_compiled_kernels_match_dense_on_gpu(dtype, block_size):
    geometry = LLAMA_8B | dict(block_size=block_size, dtype=dtype)
    rng = np.random.default_rng(4)
    lengths = [1, block_size, 300, 0, 511]
    args, scale, expected = decode_case(rng, lengths, geometry, max_blocks=512 // block_size)
    tolerance = 1e-4 if dtype == jnp.float32 else TOLERANCE[dtype]  # GPU f32 sums reorder
    for splits in (1, 4):
        out = pk.paged_decode_attention(*args, sm_scale=scale, impl="pallas", num_splits=splits)
        np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), expected,
                                   atol=tolerance, rtol=tolerance)
    q, k_pages, v_pages, tables, lens = args
    contexts = jnp.array([300, 511], jnp.int32)
    starts = jnp.array([0, 100, 101], jnp.int32)  # a 100-token chunk and a decode token
    qp = jnp.asarray(rng.normal(size=(101, 32, 128)), dtype)
    ref = pk.paged_prefill_attention(qp, k_pages, v_pages, tables[jnp.array([2, 4])], contexts,
                                     starts, sm_scale=scale, impl="reference")
    out = pk.paged_prefill_attention(qp, k_pages, v_pages, tables[jnp.array([2, 4])], contexts,
                                     starts, sm_scale=scale, impl="pallas")
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)),
                               np.asarray(ref.astype(jnp.float32)),
                               atol=tolerance, rtol=tolerance)
