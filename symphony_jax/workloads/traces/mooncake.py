"""Mooncake traces (Moonshot AI's Kimi, FAST'25): requests with prefix-block hashes.

``load_mooncake`` reads the JSON-lines traces (``conversation_trace.jsonl``,
``synthetic_trace.jsonl``, ``toolagent_trace.jsonl``): one object per line with

- ``timestamp``: integer (or number) of milliseconds from the trace start, >= 0;
- ``input_length``, ``output_length``: JSON integers >= 0 (tokens);
- ``hash_ids``: a list of integers >= 0, the ids of the prompt's ``block_size``-token blocks
  (two requests share K,V for as many leading blocks as their ids agree), so
  ``len(hash_ids) == ceil(input_length / block_size)``. Pass ``block_size=None`` to skip that
  check for traces hashed with another block size.

Other keys are ignored. The trace has no session ids (``session = -1``); ``columns`` holds
``hash_ids`` (i64[H], all rows' ids concatenated) and ``hash_offsets`` (i64[N + 1]: row r's ids
are ``hash_ids[hash_offsets[r]:hash_offsets[r + 1]]``).

``load_mooncake_sessions`` reads the reconstructed-sessions CSV shipped in
``experiments/data/mooncake/`` (header
``req_idx,timestamp_ms,input_length,output_length,num_blocks,session,turn,parent_idx,
gap_from_parent_s``; one row per request of the conversation trace, same order). It checks that
``req_idx`` counts rows from 0, that ``session`` and ``turn`` (1-based) are integers, that
``parent_idx`` is -1 exactly on first turns and otherwise an earlier row of the same session,
and that ``gap_from_parent_s`` is blank exactly on first turns. ``session_keys`` are the file's
session numbers as strings; ``columns`` holds ``turn`` (1-based, as in the file),
``parent_row`` (-1: first turn) and ``gap_from_parent_s`` (NaN on first turns).
"""

from __future__ import annotations

import os

import numpy as np

from symphony_jax.workloads.traces._format import (TraceFormatError, json_field, json_ints,
                                                   json_numbers, raise_at, read_csv,
                                                   read_jsonl, strings_to_numbers)
from symphony_jax.workloads.traces.table import TraceRequests

SESSION_COLUMNS = ("req_idx", "timestamp_ms", "input_length", "output_length", "num_blocks",
                   "session", "turn", "parent_idx", "gap_from_parent_s")


def load_mooncake(path: str | os.PathLike, *, block_size: int | None = 512) -> TraceRequests:
    lines, records = read_jsonl(path)
    field = lambda name: json_field(path, lines, records, name)
    timestamp_ms = json_numbers(path, lines, field("timestamp"), "timestamp")
    inputs = json_ints(path, lines, field("input_length"), "input_length")
    outputs = json_ints(path, lines, field("output_length"), "output_length")
    hashes = field("hash_ids")
    for number, ids in zip(lines, hashes):
        if type(ids) is not list or not all(type(i) is int and i >= 0 for i in ids):
            raise TraceFormatError(path, int(number), "hash_ids", "a list of integers >= 0", ids)
    counts = np.fromiter((len(ids) for ids in hashes), np.int64, len(hashes))
    if block_size is not None:
        expected = -(-inputs // block_size)
        if np.any(counts != expected):
            i = int(np.flatnonzero(counts != expected)[0])
            raise TraceFormatError(path, int(lines[i]), "hash_ids",
                                   f"ceil(input_length / {block_size}) = {expected[i]} ids",
                                   f"{counts[i]} ids")
    flat = np.fromiter((i for ids in hashes for i in ids), np.int64, int(counts.sum()))
    return TraceRequests(str(path), lines, timestamp_ms / 1000.0, inputs, outputs,
                         np.full(len(lines), -1, np.int64),
                         columns={"hash_ids": flat,
                                  "hash_offsets": np.concatenate([[0], np.cumsum(counts)])})


def load_mooncake_sessions(path: str | os.PathLike) -> TraceRequests:
    lines, text = read_csv(path, SESSION_COLUMNS)
    number = lambda name, **kw: strings_to_numbers(path, lines, text[name], name, **kw)
    req_idx = number("req_idx", integer=True)
    raise_at(path, lines, "req_idx", req_idx != np.arange(len(lines)), text["req_idx"],
           "the row's position (0, 1, 2, ...)")
    session_number = number("session", integer=True)
    turn = number("turn", integer=True, minimum=1)
    parent = number("parent_idx", integer=True, minimum=-1)
    gap = number("gap_from_parent_s", blank_is_nan=True)
    first = turn == 1
    raise_at(path, lines, "parent_idx", first != (parent == -1), text["parent_idx"],
           "-1 exactly on first turns (turn 1)")
    raise_at(path, lines, "gap_from_parent_s", first != np.isnan(gap), text["gap_from_parent_s"],
           "a blank exactly on first turns")
    rows = np.arange(len(lines))
    safe = np.where(first, 0, parent)
    raise_at(path, lines, "parent_idx", ~first & ((parent >= rows) |
                                                (session_number[safe] != session_number)),
           text["parent_idx"], "an earlier row of the same session")
    keys, session = np.unique(session_number, return_inverse=True)
    return TraceRequests(str(path), lines, number("timestamp_ms") / 1000.0,
                         number("input_length", integer=True),
                         number("output_length", integer=True), session.astype(np.int64),
                         tuple(str(k) for k in keys),
                         columns={"turn": turn, "parent_row": parent, "gap_from_parent_s": gap})

