"""Azure LLM inference trace 2023 (Splitwise, ISCA'24): arrivals and lengths, no sessions.

CSV with the header ``TIMESTAMP,ContextTokens,GeneratedTokens``:

- ``TIMESTAMP``: a wall-clock time ``YYYY-MM-DD HH:MM:SS[.fraction]`` (up to 9 fractional
  digits; no time zone);
- ``ContextTokens``, ``GeneratedTokens``: integers >= 0 (prompt and generated tokens).

``timestamp_s`` counts seconds from the earliest request of the file (nanosecond precision
before conversion); ``columns["start"]`` holds that time as a ``datetime64[ns]`` array of one
element. There are no sessions (``session = -1``): use the trace for arrival processes and
length distributions.
"""

from __future__ import annotations

import functools
import os
import re

import numpy as np

from symphony_jax.workloads.traces._format import TraceFormatError, read_csv, strings_to_numbers
from symphony_jax.workloads.traces.table import TraceRequests

COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(\.\d{1,9})?")
_EXPECTED_TIME = "a time YYYY-MM-DD HH:MM:SS[.fraction]"


def load_azure(path: str | os.PathLike) -> TraceRequests:
    lines, text = read_csv(path, COLUMNS)
    stamps = [s.strip() for s in text["TIMESTAMP"]]
    for number, stamp in zip(lines, stamps):
        if not _TIME.fullmatch(stamp) or not _exists(stamp[:19]):
            raise TraceFormatError(path, int(number), "TIMESTAMP", _EXPECTED_TIME, stamp)
    times = np.asarray(stamps, dtype="datetime64[ns]")
    start = times.min()
    seconds = (times - start).astype(np.int64) / 1e9
    number = lambda name: strings_to_numbers(path, lines, text[name], name, integer=True)
    return TraceRequests(str(path), lines, seconds, number("ContextTokens"),
                         number("GeneratedTokens"), np.full(len(lines), -1, np.int64),
                         columns={"start": np.asarray([start])})


@functools.lru_cache(maxsize=4096)
def _exists(day_and_time: str) -> bool:
    """The date and time (to the second) exist: a day of the calendar, hours < 24, ..."""
    try:
        np.datetime64(day_and_time, "s")
    except ValueError:
        return False
    return True
