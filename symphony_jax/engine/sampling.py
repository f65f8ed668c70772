"""Sampling: per-request parameters, their per-slot table on the device, and the sampler.

A request's random stream is ``fold_in(key(seed), token index)``: it depends on the request
alone, so a request samples the same tokens whatever it is batched with (and when it is
preempted and resumed).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

i32, f32 = jnp.int32, jnp.float32
NO_STOP = -1  # padding of a slot's stop-token row


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens.

    ``temperature`` 0 is greedy. ``top_k`` 0 and ``top_p`` 1 keep every token. ``seed`` None
    uses the request id. Generation stops after ``max_tokens`` tokens, or at a token of
    ``stop_token_ids`` or (unless ``ignore_eos``) the model's end-of-sequence tokens, which is
    kept as the last output token.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        def fail(field, expected):
            raise ValueError(f"SamplingParams.{field}={getattr(self, field)!r}: expected "
                             f"{expected}")

        is_int = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool)
        is_number = lambda v: isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
        if not is_int(self.max_tokens) or not 1 <= self.max_tokens < 2**31:
            fail("max_tokens", "an integer in [1, 2**31)")
        if not is_number(self.temperature) or not 0 <= self.temperature < np.inf:
            fail("temperature", "a finite number >= 0 (0: greedy)")
        if not is_int(self.top_k) or not 0 <= self.top_k < 2**31:
            fail("top_k", "an integer in [0, 2**31) (0: no limit)")
        if not is_number(self.top_p) or not 0 < self.top_p <= 1:
            fail("top_p", "a number in (0, 1]")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**31):
            fail("seed", "None or an integer in [0, 2**31)")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
            fail("stop_token_ids", "non-negative token ids")
        if not isinstance(self.ignore_eos, bool):
            fail("ignore_eos", "a bool")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingTable:
    """Sampling parameters of every slot (R slots, K stop tokens at most)."""

    temperature: jax.Array  # f32[R]
    top_k: jax.Array  # i32[R]
    top_p: jax.Array  # f32[R]
    seed: jax.Array  # i32[R]
    stop_ids: jax.Array  # i32[R, K]  NO_STOP where unused

    @staticmethod
    def create(num_slots: int, max_stop_ids: int) -> SamplingTable:
        return SamplingTable(jnp.zeros(num_slots, f32), jnp.zeros(num_slots, i32),
                             jnp.ones(num_slots, f32), jnp.zeros(num_slots, i32),
                             jnp.full((num_slots, max_stop_ids), NO_STOP, i32))

    @staticmethod
    def rows(params: list[SamplingParams], seeds: list[int], eos_token_ids: tuple[int, ...],
             max_stop_ids: int, size: int) -> SamplingTable:
        """Host rows for ``params`` (padded to ``size``), ready to scatter into slots."""
        stops = np.full((size, max_stop_ids), NO_STOP, np.int32)
        for i, p in enumerate(params):
            ids = list(dict.fromkeys(p.stop_token_ids + (() if p.ignore_eos else eos_token_ids)))
            if len(ids) > max_stop_ids:
                raise ValueError(f"SamplingParams.stop_token_ids: {len(ids)} stop tokens "
                                 f"(with end-of-sequence ones), at most {max_stop_ids}")
            stops[i, : len(ids)] = ids
        column = lambda values, dtype, pad: np.pad(np.asarray(values, dtype),
                                                   (0, size - len(values)), constant_values=pad)
        return SamplingTable(
            temperature=column([p.temperature for p in params], np.float32, 0),
            top_k=column([p.top_k for p in params], np.int32, 0),
            top_p=column([p.top_p for p in params], np.float32, 1),
            seed=column(seeds, np.int32, 0), stop_ids=stops)

    def at(self, slots: jax.Array) -> SamplingTable:
        return jax.tree.map(lambda x: x.at[slots].get(mode="fill", fill_value=0), self)

    def put(self, slots: jax.Array, rows: SamplingTable) -> SamplingTable:
        """Rows scattered into ``slots`` (out of range: dropped)."""
        return jax.tree.map(lambda x, r: x.at[slots].set(r, mode="drop"), self, rows)


def _nucleus(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Logits [B, V] with every token outside the top-k and the top-p nucleus set to -inf."""
    vocab = logits.shape[-1]
    ranked = -jnp.sort(-logits, axis=-1)  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(ranked, (k - 1)[:, None], axis=-1)
    ranked = jnp.where(jnp.arange(vocab)[None, :] < k[:, None], ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    # Keep a token while the mass of the tokens ranked above it is below top_p.
    before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(before < top_p[:, None], ranked, jnp.inf), axis=-1)
    threshold = jnp.maximum(kth[:, 0], cutoff)
    return jnp.where(logits >= threshold[:, None], logits, -jnp.inf)


def sample(logits: jax.Array, table: SamplingTable, token_index: jax.Array) -> jax.Array:
    """i32[B]: a token for each row of ``logits: f32[B, V]`` under its slot's parameters
    (``table`` rows of the batch); ``token_index: i32[B]`` numbers the token in its request."""
    greedy = jnp.argmax(logits, axis=-1).astype(i32)

    def draw():
        scaled = logits / jnp.maximum(table.temperature, 1e-6)[:, None]
        allowed = _nucleus(scaled, table.top_k, table.top_p)
        keys = jax.vmap(lambda seed, i: jax.random.fold_in(jax.random.key(seed), i))(
            table.seed, token_index)
        drawn = jax.vmap(jax.random.categorical)(keys, allowed).astype(i32)
        return jnp.where(table.temperature > 0, drawn, greedy)

    return jax.lax.cond(jnp.any(table.temperature > 0), draw, lambda: greedy)


def is_stop(tokens: jax.Array, stop_ids: jax.Array) -> jax.Array:
    """bool[B]: each token is one of its row's stop tokens (``stop_ids: i32[B, K]``)."""
    return (tokens[:, None] == stop_ids).any(axis=-1)
