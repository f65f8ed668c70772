"""Checking a request's fields where it enters (the engine, the cluster), so that a request
the device cannot hold (an id beyond its int32 columns, a token the vocabulary lacks, more stop
tokens than a slot keeps) is refused alone, with a message naming the field, and never reaches
a batch that other requests share."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from symphony_jax.engine.sampling import SamplingParams

MAX_SESSION_ID = 2**31 - 2  # the scheduler's int32 columns; -1 is ``state.NO_SESSION``


def is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def session_id(value, where: str) -> int:
    """``value`` as a session id, or a ``ValueError`` naming it."""
    if not is_int(value) or not 0 <= value <= MAX_SESSION_ID:
        raise ValueError(f"{where}: session_id={value!r}: expected an integer in "
                         f"[0, {MAX_SESSION_ID}]")
    return int(value)


def token_ids(values, vocab_size: int, field: str, *, empty: bool = False) -> list[int]:
    """``values`` as token ids in ``[0, vocab_size)`` (integers: a float or a bool is refused,
    not truncated), or a ``ValueError`` naming ``field`` and the first bad element."""
    if hasattr(values, "__array__") and not isinstance(values, Sequence):
        values = np.asarray(values).tolist()  # numpy or JAX: Python ints, or floats (refused)
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{field}: expected a sequence of token ids, got "
                         f"{type(values).__name__}")
    if not empty and len(values) == 0:
        raise ValueError(f"{field}: expected 1 or more token ids, got none")
    for i, t in enumerate(values):
        if not is_int(t) or not 0 <= t < vocab_size:
            raise ValueError(f"{field}[{i}]={t!r}: expected a token id, an integer in "
                             f"[0, {vocab_size})")
    return [int(t) for t in values]


def sampling(params, vocab_size: int, eos_token_ids: Sequence[int], max_stop_ids: int,
             where: str) -> SamplingParams:
    """``params`` (None: the defaults) checked against what the engine's sampling table holds:
    stop tokens in the vocabulary, and no more of them (end-of-sequence ones included, unless
    ``ignore_eos``) than a slot's ``max_stop_ids``."""
    params = SamplingParams() if params is None else params
    if not isinstance(params, SamplingParams):
        raise ValueError(f"{where}: sampling={params!r}: expected a SamplingParams")
    token_ids(params.stop_token_ids, vocab_size, f"{where}: SamplingParams.stop_token_ids",
              empty=True)
    stops = len(set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids)))
    if stops > max_stop_ids:
        raise ValueError(f"{where}: SamplingParams.stop_token_ids: {stops} stop tokens (with the "
                         f"model's end-of-sequence ones), at most {max_stop_ids} (the engine's "
                         "max_stop_ids)")
    return params
