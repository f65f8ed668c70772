"""The sampler against NumPy: greedy, top-k / top-p sets, seeds, and the softmax distribution."""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings

from symphony_jax.engine.sampling import SamplingParams, SamplingTable, is_stop, sample

sample_jit = jax.jit(sample)


def table(rows: int, temperature=0.0, top_k=0, top_p=1.0, seed=0) -> SamplingTable:
    full = lambda value, dtype: jnp.full(rows, value, dtype)
    return SamplingTable(full(temperature, jnp.float32), full(top_k, jnp.int32),
                         full(top_p, jnp.float32), full(seed, jnp.int32),
                         jnp.full((rows, 2), -1, jnp.int32))


def allowed_set(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> set[int]:
    """Tokens a top-k / top-p sampler may draw, computed in float64."""
    scaled = logits / temperature
    order = np.argsort(-scaled, kind="stable")
    keep = order[: top_k] if top_k else order
    probs = np.exp(scaled[keep] - scaled[keep].max())
    probs /= probs.sum()
    before = np.cumsum(probs) - probs
    return set(keep[before < top_p - 1e-6].tolist()) | {int(keep[0])}


def test_greedy_and_top_k_one_are_argmax():
    logits = jax.random.normal(jax.random.key(0), (16, 50))
    expected = np.asarray(jnp.argmax(logits, -1))
    index = jnp.zeros(16, jnp.int32)
    assert (np.asarray(sample_jit(logits, table(16), index)) == expected).all()
    sharp = table(16, temperature=1.0, top_k=1)
    assert (np.asarray(sample_jit(logits, sharp, index)) == expected).all()


@settings(max_examples=15)
@given(seed=st.integers(0, 2**20), temperature=st.floats(0.3, 2.0),
       top_k=st.integers(0, 12), top_p=st.floats(0.05, 1.0))
def test_draws_stay_inside_the_top_k_top_p_set(seed, temperature, top_k, top_p):
    logits = np.asarray(jax.random.normal(jax.random.key(seed), (20,)) * 3, np.float64)
    allowed = allowed_set(logits, temperature, top_k, top_p)
    rows = 64  # 64 draws: one row per token index
    drawn = sample_jit(jnp.tile(jnp.asarray(logits, jnp.float32), (rows, 1)),
                       table(rows, temperature, top_k, top_p, seed), jnp.arange(rows))
    assert set(np.asarray(drawn).tolist()) <= allowed


def test_draws_follow_the_softmax():
    logits = jnp.asarray([2.0, 1.0, 0.0, -1.0, 0.5])
    n = 4000
    drawn = np.asarray(sample_jit(jnp.tile(logits, (n, 1)), table(n, temperature=1.0),
                                  jnp.arange(n)))
    counts = np.bincount(drawn, minlength=5)
    expected = np.asarray(jax.nn.softmax(logits)) * n
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 20.5  # chi-square, 4 degrees of freedom, p = 0.0004


def test_a_request_draws_the_same_tokens_whatever_its_batch():
    logits = jax.random.normal(jax.random.key(1), (3, 30))
    params = table(3, temperature=1.0, seed=11)
    index = jnp.asarray([5, 5, 6])
    batched = np.asarray(sample_jit(logits, params, index))
    alone = [int(sample_jit(logits[i:i + 1], table(1, temperature=1.0, seed=11), index[i:i + 1])[0])
             for i in range(3)]
    assert batched.tolist() == alone
    other_seed = np.asarray(sample_jit(jnp.tile(logits[:1], (32, 1)),
                                       table(32, temperature=1.0, seed=12), jnp.arange(32)))
    same_seed = np.asarray(sample_jit(jnp.tile(logits[:1], (32, 1)),
                                      table(32, temperature=1.0, seed=11), jnp.arange(32)))
    assert other_seed.tolist() != same_seed.tolist()


def test_stop_rows_include_end_of_sequence_unless_ignored():
    rows = SamplingTable.rows([SamplingParams(stop_token_ids=(7,)),
                               SamplingParams(stop_token_ids=(7,), ignore_eos=True)],
                              [0, 0], eos_token_ids=(2,), max_stop_ids=3, size=2)
    assert rows.stop_ids.tolist() == [[7, 2, -1], [7, -1, -1]]
    assert np.asarray(is_stop(jnp.asarray([2, 2]), jnp.asarray(rows.stop_ids))).tolist() == [
        True, False]
