"""The paged forward equals the dense (contiguous cache) forward of the same model."""

import time

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from paged_runs import PagedRun
from symphony_jax.config import CacheConfig, EngineConfig, SchedulerConfig, model_preset
from symphony_jax.memory import block_table as bt
from symphony_jax.memory import kv_cache, layout
from symphony_jax.model import dense, llama
from symphony_jax.model.params import init_params

TINY = model_preset("tiny")
PARAMS = init_params(TINY, jax.random.key(0))
T, B = 128, 4  # PagedRun's fixed shapes: 3 prompts of <= 40 tokens fit a mixed step


def dense_logits(prompts: list[np.ndarray]) -> np.ndarray:
    """float64 logits of every position of every sequence, from the dense forward."""
    longest = max(len(p) for p in prompts)
    tokens = np.zeros((len(prompts), longest), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    out, _ = dense.forward(PARAMS, dense.init_cache(TINY, len(prompts), longest), tokens,
                           config=TINY)
    return np.asarray(out, np.float64)


@st.composite
def chunked_runs(draw):
    """Prompts, each cut into chunks at arbitrary boundaries, then some decode tokens."""
    n = draw(st.integers(1, 3))
    prompts = [draw(st.integers(1, 40)) for _ in range(n)]
    chunks = []
    for length in prompts:
        cuts = sorted(draw(st.sets(st.integers(1, length - 1), max_size=3))) if length > 1 else []
        chunks.append(np.diff([0, *cuts, length]).tolist())
    return prompts, chunks, draw(st.integers(0, 3)), draw(st.integers(0, 2**31))


@settings(max_examples=10)
@given(run=chunked_runs(), layer_groups=st.sampled_from([(0, 0), (0, 1)]))
def test_chunked_prefill_then_decode_matches_dense(run, layer_groups):
    prompt_lens, chunks, decode_steps, seed = run
    rng = np.random.default_rng(seed)
    total = [n + decode_steps for n in prompt_lens]
    sequences = [rng.integers(0, TINY.vocab_size, n).astype(np.int32) for n in total]
    expected = dense_logits(sequences)
    paged, done = PagedRun(PARAMS, TINY, layer_groups=layer_groups), [0] * len(sequences)
    while any(chunks):  # each step takes the next chunk of every sequence that has one
        batch = [(s, sequences[s][done[s]:done[s] + c.pop(0)]) for s, c in enumerate(chunks) if c]
        for (s, tokens), got in zip(batch, paged.step(batch)):
            done[s] += len(tokens)
            np.testing.assert_allclose(got, expected[s, done[s] - 1], atol=2e-5, rtol=2e-5)
    for _ in range(decode_steps):
        batch = [(s, sequences[s][done[s]:done[s] + 1]) for s in range(len(sequences))]
        for (s, _), got in zip(batch, paged.step(batch, decode=True)):
            done[s] += 1
            np.testing.assert_allclose(got, expected[s, done[s] - 1], atol=2e-5, rtol=2e-5)


def test_all_logits_cover_every_token():
    rng = np.random.default_rng(1)
    sequence = rng.integers(0, TINY.vocab_size, 20).astype(np.int32)
    out = PagedRun(PARAMS, TINY).step([(0, sequence)], all_logits=True)
    np.testing.assert_allclose(out, dense_logits([sequence])[0], atol=2e-5, rtol=2e-5)


def test_steps_do_not_recompile():
    llama.forward.clear_cache()
    rng = np.random.default_rng(2)
    paged = PagedRun(PARAMS, TINY)
    for step in range(6):
        paged.step([(s, rng.integers(0, 256, 1 + (step * s) % 5)) for s in range(3)])
    assert llama.forward._cache_size() == 1


def test_tiny_model_compiles_in_seconds():
    paged = PagedRun(PARAMS, TINY)
    step_layout = layout.build(paged.table, np.zeros(B, np.int32), np.zeros(B, np.int32),
                               num_tokens=T)
    lowered = llama.forward.lower(PARAMS, paged.pool, np.zeros(T, np.int32), step_layout,
                                  config=TINY, layer_groups=(0, 0), all_logits=True)
    start = time.perf_counter()
    lowered.compile()
    assert time.perf_counter() - start < 10.0


def test_copy_blocks_copies_every_layer_and_skips_out_of_range():
    pool = kv_cache.create(TINY, CacheConfig(block_size=4, num_device_blocks=6),
                           dtype="float32")
    pool = kv_cache.KVPool(jnp.arange(pool.k.size, dtype=jnp.float32).reshape(pool.k.shape),
                           -jnp.arange(pool.v.size, dtype=jnp.float32).reshape(pool.v.shape))
    before = jax.tree.map(np.asarray, pool)
    after = kv_cache.copy_blocks(pool, jnp.array([2, 0]), jnp.array([5, 6]))
    np.testing.assert_array_equal(after.k[:, :, 5], before.k[:, :, 2])
    np.testing.assert_array_equal(after.v[:, :, 5], before.v[:, :, 2])
    np.testing.assert_array_equal(after.k[:, :, :5], before.k[:, :, :5])


def test_layout_marks_padding():
    slots, blocks, block_size = 4, 48, 8
    table, _ = bt.reserve(bt.create(slots, blocks, 8, block_size), [2, 0], [5, 3])
    out = layout.build(table, np.array([2, 0, 7, 1]), np.array([5, 3, 4, 0]), num_tokens=12)
    assert np.asarray(out.query_start_loc).tolist() == [0, 5, 8, 8, 8]
    assert np.asarray(out.positions).tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 0, 0, 0]
    assert np.asarray(out.token_slots).tolist() == [2] * 5 + [0] * 3 + [slots] * 4
    assert np.asarray(out.slot_mapping)[0, 8:].tolist() == [blocks * block_size] * 4
    assert np.asarray(out.logits_indices)[:2].tolist() == [4, 7]


def test_forward_checks_layer_groups():
    config = EngineConfig(TINY, CacheConfig(num_layer_groups=2), SchedulerConfig(max_model_len=64))
    assert config.layer_groups == (0, 1)
    paged = PagedRun(PARAMS, TINY)
    with pytest.raises(ValueError, match="3 layer groups for 2 layers"):
        llama.forward(PARAMS, paged.pool, np.zeros(T, np.int32),
                      layout.build(paged.table, np.zeros(B, np.int32), np.zeros(B, np.int32),
                                   num_tokens=T),
                      config=TINY, layer_groups=(0, 0, 0))


@pytest.mark.parametrize("tokens, decode", [(1, True), (1, False), (4, False)])
def test_the_layer_scan_updates_the_pool_in_place(tokens, decode):
    """No copy of a pool-sized array in the compiled step: a layer's K/V write must not copy
    the pool (XLA does for a one-token scatter unless it is kept a scatter)."""
    run = PagedRun(PARAMS, TINY, slots=tokens, tokens=tokens)
    run.table, _ = bt.reserve(run.table, np.arange(tokens), np.full(tokens, 9))
    step_layout = layout.build(run.table, np.arange(tokens), np.ones(tokens, np.int32),
                               num_tokens=tokens)
    compiled = llama.forward.lower(PARAMS, run.pool, np.zeros(tokens, np.int32), step_layout,
                                   config=TINY, layer_groups=(0, 0), decode=decode).compile()
    pool = run.pool.k.shape
    flat = f"{pool[0]},{pool[1]},{pool[2] * pool[3]},{pool[4]}"
    shapes = (",".join(map(str, pool)), flat)
    copies = [line for line in compiled.as_text().splitlines()
              if " copy(" in line and any(f"[{s}]" in line for s in shapes)]
    assert not copies, copies[:2]
