"""Argument checks and array helpers shared by the workload modules.

A bad value raises ``ValueError`` naming its owner, the field, the value and what is allowed.
Columns are converted to read-only 1-D numpy arrays of an explicit dtype; integer columns
refuse non-integral values instead of truncating them.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def fail(owner: str, field: str, value: Any, expected: str) -> None:
    raise ValueError(f"{owner}.{field}={value!r}: expected {expected}")


def check_number(owner: str, field: str, value: Any, low: float, high: float = np.inf,
                 *, low_open: bool = False, high_open: bool = False) -> None:
    """``value`` must be a real number in the interval [low, high] (or open at either end)."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if ok:
        ok = (value > low if low_open else value >= low) and \
             (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        fail(owner, field, value, f"a number in {interval}")


def column(owner: str, field: str, values: Any, dtype: type, length: int | None = None,
           minimum: float | None = None) -> np.ndarray:
    """``values`` as a read-only 1-D array of ``dtype``, checked for length and minimum."""
    array = np.asarray(values)
    if array.ndim != 1:
        fail(owner, field, f"<array of shape {array.shape}>", "a 1-D array")
    if length is not None and len(array) != length:
        fail(owner, field, f"<array of length {len(array)}>", f"length {length}")
    if array.dtype.kind not in "biuf":
        fail(owner, field, f"<array of {array.dtype}>", "an array of numbers")
    if np.issubdtype(dtype, np.integer) and array.dtype.kind == "f":
        nonintegral = ~np.isfinite(array) | (array != np.round(array))
        if nonintegral.any():
            bad = _first(nonintegral)
            fail(owner, f"{field}[{bad}]", array[bad].item(), "an integer")
    array = array.astype(dtype, copy=True)
    if minimum is not None and len(array):
        below = ~(array >= minimum)  # catches NaN too
        if below.any():
            bad = _first(below)
            fail(owner, f"{field}[{bad}]", array[bad].item(), f">= {minimum}")
    array.flags.writeable = False
    return array


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def positions_in_groups(sizes: np.ndarray) -> np.ndarray:
    """i64[sum(sizes)]: 0, 1, ..., sizes[0]-1, 0, 1, ..., sizes[1]-1, ... (rank within group)."""
    sizes = np.asarray(sizes, np.int64)
    return np.arange(sizes.sum(), dtype=np.int64) - np.repeat(np.cumsum(sizes) - sizes, sizes)


def cumsum_in_groups(values: np.ndarray, sizes: np.ndarray, *,
                     exclusive: bool = False) -> np.ndarray:
    """Running sums along axis 0 that restart at each group of consecutive rows.

    ``sizes`` are the group lengths (summing to ``len(values)``); ``exclusive`` leaves each
    row's own value out.
    """
    values, sizes = np.asarray(values), np.asarray(sizes, np.int64)
    total = np.cumsum(values, axis=0)
    starts = (np.cumsum(sizes) - sizes)[sizes > 0]
    running = total - np.repeat((total - values)[starts], sizes[sizes > 0], axis=0)
    return running - values if exclusive else running


def run_lengths(keys: np.ndarray) -> np.ndarray:
    """i64[G]: lengths of the runs of equal consecutive values of ``keys`` (rows grouped)."""
    keys = np.asarray(keys)
    if not len(keys):
        return np.zeros(0, np.int64)
    boundaries = np.flatnonzero(keys[1:] != keys[:-1]) + 1
    return np.diff(np.concatenate([[0], boundaries, [len(keys)]])).astype(np.int64)
