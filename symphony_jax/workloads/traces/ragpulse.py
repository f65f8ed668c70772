"""RAGPulse (a university question-answering RAG service, arXiv 2511.12979): real sessions.

One JSON object per line with

- ``timestamp``: seconds from the trace start, a string holding a number (or a number), >= 0;
- ``input_length``, ``output_length``: JSON integers >= 0 (tokens);
- ``session_id``: a non-empty string;
- ``hash_ids``: an object with the lists ``sys_prompt``, ``passages_ids``, ``history``,
  ``web_search`` and ``user_input`` of integer content ids.

Other keys are ignored. Rows stay in file order, which is not quite time order (the shipped
trace has one inversion); ``to_workload`` sorts. ``session_keys`` are the distinct
``session_id`` strings in order of first appearance. ``columns`` holds nothing.
"""

from __future__ import annotations

import os

import numpy as np

from symphony_jax.workloads.traces._format import (TraceFormatError, json_field, json_ints,
                                                   json_numbers, read_jsonl)
from symphony_jax.workloads.traces.table import TraceRequests

HASH_COMPONENTS = ("sys_prompt", "passages_ids", "history", "web_search", "user_input")


def load_ragpulse(path: str | os.PathLike) -> TraceRequests:
    lines, records = read_jsonl(path)
    field = lambda name: json_field(path, lines, records, name)
    timestamp = json_numbers(path, lines, field("timestamp"), "timestamp", numeric_strings=True)
    inputs = json_ints(path, lines, field("input_length"), "input_length")
    outputs = json_ints(path, lines, field("output_length"), "output_length")
    for number, ids in zip(lines, field("hash_ids")):
        _check_components(path, int(number), ids)
    keys: dict[str, int] = {}
    session = np.empty(len(lines), np.int64)
    for i, (number, key) in enumerate(zip(lines, field("session_id"))):
        if not isinstance(key, str) or not key:
            raise TraceFormatError(path, int(number), "session_id", "a non-empty string", key)
        session[i] = keys.setdefault(key, len(keys))
    return TraceRequests(str(path), lines, timestamp, inputs, outputs, session, tuple(keys))


def _check_components(path, line: int, ids) -> None:
    if not isinstance(ids, dict):
        raise TraceFormatError(path, line, "hash_ids", f"an object with {HASH_COMPONENTS}", ids)
    for name in HASH_COMPONENTS:
        value = ids.get(name)
        if type(value) is not list or not all(type(i) is int for i in value):
            raise TraceFormatError(path, line, f"hash_ids.{name}", "a list of integers", value)
