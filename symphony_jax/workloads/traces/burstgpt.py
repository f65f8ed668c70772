"""BurstGPT (Azure OpenAI GPT usage logs, arXiv 2401.17644): both published CSV layouts.

Header of ``BurstGPT_1.csv`` / ``BurstGPT_2.csv`` (release v1.x)::

    Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type

``BurstGPT_3.csv`` (later releases) inserts ``Session ID`` and ``Elapsed time`` after
``Timestamp``. Columns are found by name, so either layout (or any column order) loads.

- ``Timestamp``: seconds since 00:00 of the log's first day (a number >= 0);
- ``Model``: a non-empty string (``ChatGPT`` or ``GPT-4`` in the published files);
- ``Request tokens``, ``Response tokens``, ``Total tokens``: integers >= 0 (a failed request
  has 0 response tokens; ``to_workload`` refuses those unless ``drop_failed=True``), the
  total their sum (a row where it is not was logged wrong, and is an error);
- ``Log Type``: ``Conversation log`` or ``API log``;
- ``Session ID`` (optional): the conversation id, blank on API rows (and allowed blank
  anywhere: such a row has no session);
- ``Elapsed time`` (optional): seconds from submission to the complete response, >= 0,
  blank allowed.

``session_keys`` are the distinct non-blank session ids in order of first appearance.
``columns`` holds ``model`` and ``log_type`` (str arrays), ``total_tokens`` (i64) and
``elapsed_s`` (f64, NaN where blank or absent).
"""

from __future__ import annotations

import os

import numpy as np

from symphony_jax.workloads.traces._format import raise_at, read_csv, strings_to_numbers
from symphony_jax.workloads.traces.table import TraceRequests

REQUIRED = ("Timestamp", "Model", "Request tokens", "Response tokens", "Total tokens",
            "Log Type")
OPTIONAL = ("Session ID", "Elapsed time")
LOG_TYPES = ("Conversation log", "API log")


def load_burstgpt(path: str | os.PathLike) -> TraceRequests:
    lines, text = read_csv(path, REQUIRED, OPTIONAL)
    integers = lambda name: strings_to_numbers(path, lines, text[name], name, integer=True)
    model = np.asarray([m.strip() for m in text["Model"]])
    raise_at(path, lines, "Model", model == "", text["Model"], "a model name")
    log_type = np.asarray([t.strip() for t in text["Log Type"]])
    raise_at(path, lines, "Log Type", ~np.isin(log_type, LOG_TYPES), text["Log Type"],
             f"one of {LOG_TYPES}")
    elapsed = strings_to_numbers(path, lines, text["Elapsed time"], "Elapsed time",
                                 blank_is_nan=True) if "Elapsed time" in text else \
        np.full(len(lines), np.nan)
    keys: dict[str, int] = {}
    session = np.full(len(lines), -1, np.int64)
    for i, key in enumerate(text.get("Session ID", ())):
        key = key.strip()
        if key:
            session[i] = keys.setdefault(key, len(keys))
    request, response, total = (integers(name) for name in (
        "Request tokens", "Response tokens", "Total tokens"))
    raise_at(path, lines, "Total tokens", total != request + response, text["Total tokens"],
             "Request tokens + Response tokens")
    return TraceRequests(
        str(path), lines, strings_to_numbers(path, lines, text["Timestamp"], "Timestamp"),
        request, response, session, tuple(keys),
        columns={"model": model, "log_type": log_type, "total_tokens": total,
                 "elapsed_s": elapsed})
