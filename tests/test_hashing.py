"""Block keys: the device's BLAKE2s against hashlib, the device's chain against the host's
prompt keys, and the prefix property."""

import hashlib

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings

from symphony_jax.engine import hashing

blake2s = jax.jit(hashing.blake2s, static_argnames="digest_words")
chain = jax.jit(hashing.chain)


@settings(max_examples=20, deadline=None)
@given(words=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=40),
       digest_words=st.sampled_from([4, 8]))
def test_device_blake2s_is_hashlibs(words, digest_words):
    data = np.asarray(words, "<u4")
    expected = np.frombuffer(hashlib.blake2s(data.tobytes(), digest_size=4 * digest_words)
                             .digest(), "<u4")
    got = np.asarray(blake2s(jnp.asarray(data[None].astype(np.uint32)), digest_words))
    np.testing.assert_array_equal(got[0], expected)


@settings(max_examples=10, deadline=None)
@given(tokens=st.lists(st.integers(0, 200_000), min_size=0, max_size=50),
       salt=st.sampled_from([None, "", "tenant-a", "tenant-b"]))
def test_device_chain_continues_the_host_prompt_keys(tokens, salt):
    bs = 8
    root = hashing.root_key(salt)
    keys = hashing.prompt_keys(tokens, bs, root)
    assert keys.shape == (len(tokens) // bs, hashing.KEY_WORDS)
    parent = root
    for j, key in enumerate(keys):
        block = jnp.asarray(tokens[j * bs:(j + 1) * bs], jnp.int32)[None]
        parent = np.asarray(chain(jnp.asarray(parent)[None], block))[0]
        np.testing.assert_array_equal(parent, key)


def test_known_keys_are_reused_and_extended():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 32_000, 64).tolist()
    root = hashing.root_key("s")
    full = hashing.prompt_keys(tokens, 8, root)
    np.testing.assert_array_equal(hashing.prompt_keys(tokens, 8, root, known=full[:3]), full)
    # Known keys are trusted, not recomputed: that is the point of passing them.
    assert (hashing.prompt_keys(tokens, 8, root, known=full[:3] + 1)[:3] == full[:3] + 1).all()


def test_equal_prefixes_equal_keys_and_a_change_changes_every_later_key():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 32_000, 32)
    b = a.copy()
    b[9] += 1  # block 1 of 8-token blocks
    root = hashing.root_key(None)
    ka, kb = hashing.prompt_keys(a.tolist(), 8, root), hashing.prompt_keys(b.tolist(), 8, root)
    assert (ka[0] == kb[0]).all()
    assert all((ka[j] != kb[j]).any() for j in range(1, 4))


def test_salts_name_different_roots_and_no_key_is_zero():
    roots = [hashing.root_key(s) for s in (None, "", "a", "b")]
    assert len({r.tobytes() for r in roots}) == 4
    keys = hashing.prompt_keys(list(range(80)), 4, roots[2])
    assert (keys != 0).any(axis=1).all()
