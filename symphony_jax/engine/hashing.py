"""Block keys of token sequences, for the prefix cache.

A full block's key is a cryptographic hash of the key before it and the block's token ids,
``key_j = BLAKE2s-128(key_{j-1} || tokens_j)``, starting from a *root* key that hashes the
request's cache salt: equal keys mean equal salts and equal prefixes unless BLAKE2s collides,
which a prompt cannot be built to do (a polynomial hash can: its keys are linear in the tokens).
The prefix cache still checks every hit against the block's token ids, so not even a collision
serves another prefix's K,V.

Keys are computed where the tokens are: on the host with ``hashlib`` for a prompt
(``prompt_keys``), and on the device (``chain``, the same function in JAX, bit for bit) for a
block that a sampled token completes, so that a finishing sequence's blocks enter the cache in
the step that finishes it. A key is ``KEY_WORDS`` little-endian uint32 words of the digest;
tokens are hashed as little-endian int32.

``kv_owner`` names what an engine's K,V belongs to (its model and cache geometry), for the disk
tier's entries.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from symphony_jax.scheduler.prefix_cache import KEY_WORDS

u32 = jnp.uint32
DIGEST_BYTES = 4 * KEY_WORDS
_ROOT_PREFIX = b"symphony-jax prefix cache root\x00"


def root_key(salt: str | None) -> np.ndarray:
    """u32[KEY_WORDS]: the key a sequence's first block chains from (``salt`` None: no salt)."""
    data = _ROOT_PREFIX + (b"" if salt is None else b"\x01" + salt.encode("utf-8"))
    return np.frombuffer(hashlib.blake2s(data, digest_size=DIGEST_BYTES).digest(), "<u4").copy()


def prompt_keys(tokens: Sequence[int], block_size: int, root: np.ndarray,
                known: np.ndarray | None = None) -> np.ndarray:
    """u32[len(tokens) // block_size, KEY_WORDS]: the keys of the full blocks of ``tokens``
    chained from ``root``. ``known``: keys already computed for a prefix of these tokens (a
    session's earlier turns); only the blocks after them are hashed."""
    count = len(tokens) // block_size
    keys = np.zeros((count, KEY_WORDS), np.uint32)
    start = 0 if known is None else min(len(known), count)
    if start:
        keys[:start] = known[:start]
    data = np.asarray(tokens[:count * block_size], "<i4").tobytes()
    parent = (keys[start - 1] if start else root).astype("<u4").tobytes()
    width = 4 * block_size
    for j in range(start, count):
        parent = hashlib.blake2s(parent + data[j * width:(j + 1) * width],
                                 digest_size=DIGEST_BYTES).digest()
        keys[j] = np.frombuffer(parent, "<u4")
    return keys


# BLAKE2s (RFC 7693) over uint32 words, for ``chain`` on the device: its initial vector and
# the order of the message words in each of its ten rounds.
_IV = np.array([0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A,
                0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19], np.uint32)
_SIGMA = np.array(((0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
          (14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3),
          (11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4),
          (7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8),
          (9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13),
          (2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9),
          (12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11),
          (13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10),
          (6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5),
          (10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0)), np.int32)


def _rotr(x: jax.Array, n: int) -> jax.Array:
    return (x >> u32(n)) | (x << u32(32 - n))


def _mix(a, b, c, d, x, y):
    """BLAKE2s's G on four columns at once (each argument ``u32[4, ...]``)."""
    a = a + b + x
    d = _rotr(d ^ a, 16)
    c = c + d
    b = _rotr(b ^ c, 12)
    a = a + b + y
    d = _rotr(d ^ a, 8)
    c = c + d
    b = _rotr(b ^ c, 7)
    return a, b, c, d


def _compress(h: jax.Array, block: jax.Array, counted: int, last: bool) -> jax.Array:
    """BLAKE2s's compression of one 16-word ``block`` (``u32[16, ...]``) into ``h``
    (``u32[8, ...]``), after ``counted`` message bytes in all.

    The ten rounds are a loop, not unrolled: unrolled, XLA's CPU backend fuses them into one
    expression whose every value is read twice, and its generated code recomputes them
    exponentially (five rounds took seconds, ten never finished)."""
    ones = [1] * (h.ndim - 1)
    counter_and_flag = np.zeros(16, np.uint32)
    counter_and_flag[12:15] = counted & 0xFFFFFFFF, counted >> 32, 0xFFFFFFFF if last else 0
    v = jnp.concatenate([h, jnp.broadcast_to(jnp.asarray(_IV.reshape(8, *ones)), h.shape)])
    v = v ^ jnp.asarray(counter_and_flag.reshape(16, *ones))

    def round_(r, v):
        m = block[jnp.asarray(_SIGMA)[r]]
        a, b, c, d = _mix(v[0:4], v[4:8], v[8:12], v[12:16], m[0:8:2], m[1:8:2])
        # The diagonals: (0, 5, 10, 15), (1, 6, 11, 12), ... as columns of rotated rows.
        a, b, c, d = _mix(a, jnp.roll(b, -1, 0), jnp.roll(c, -2, 0), jnp.roll(d, -3, 0),
                          m[8:16:2], m[9:16:2])
        return jnp.concatenate([a, jnp.roll(b, 1, 0), jnp.roll(c, 2, 0), jnp.roll(d, 3, 0)])

    v = jax.lax.fori_loop(0, len(_SIGMA), round_, v)
    return h ^ v[:8] ^ v[8:]


def blake2s(words: jax.Array, digest_words: int = KEY_WORDS) -> jax.Array:
    """u32[..., digest_words]: BLAKE2s (no key) of the bytes of ``words: u32[..., n]`` (n >= 1,
    little-endian), as ``hashlib.blake2s(data, digest_size=4 * digest_words)`` gives them."""
    n = words.shape[-1]
    words = jnp.moveaxis(words.astype(u32), -1, 0)  # u32[n, ...]
    words = jnp.concatenate([words, jnp.zeros((-n % 16, *words.shape[1:]), u32)])
    iv = _IV.copy()
    iv[0] ^= 0x01010000 | 4 * digest_words
    h = jnp.broadcast_to(jnp.asarray(iv.reshape(8, *[1] * (words.ndim - 1))),
                         (8, *words.shape[1:]))
    chunks = words.shape[0] // 16
    for c in range(chunks):
        last = c == chunks - 1
        h = _compress(h, words[16 * c:16 * (c + 1)], 4 * n if last else 64 * (c + 1), last)
    return jnp.moveaxis(h[:digest_words], 0, -1)


def chain(parent: jax.Array, tokens: jax.Array) -> jax.Array:
    """u32[..., KEY_WORDS]: the key of blocks of ``tokens: i32[..., block_size]`` after blocks
    keyed ``parent: u32[..., KEY_WORDS]`` — ``prompt_keys``'s step, on the device."""
    return blake2s(jnp.concatenate([parent.astype(u32),
                                    jax.lax.bitcast_convert_type(tokens.astype(jnp.int32), u32)],
                                   axis=-1))


def kv_owner(config, params) -> str:
    """What an engine's K,V belongs to, as a disk tier's ``owner``: the model's geometry, the
    cache's block size and layer groups, and a sample of the weights (each array's first 64
    values), so that an entry another model or geometry saved is never used."""
    digest = hashlib.blake2s(repr((config.model, config.cache.block_size,
                                   config.cache.num_layer_groups)).encode())
    for leaf in jax.tree.leaves(params):
        digest.update(np.asarray(jax.device_get(jnp.ravel(leaf)[:64])).tobytes())
    return digest.hexdigest()
