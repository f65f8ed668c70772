"""Serving metrics from per-request, per-token, per-step and per-transfer records (numpy only).

The real cluster and the simulator both emit the four record tables below; every metric is a
vectorised function of them. Times are seconds on one clock (the workload's, 0 at its start);
sizes are bytes; counts are tokens. Each table is a frozen dataclass of equal-length 1-D
arrays, validated on construction, with CSV and JSON round trips (``to_csv``/``from_csv``,
``to_json``/``from_json``; NaN is written ``nan`` in CSV and ``null`` in JSON).

Definitions (R requests; "finished" means ``finish_s`` is not NaN):

- TTFT = first_token_s - arrival_s. TPOT = (finish_s - first_token_s) / (output_tokens - 1),
  undefined for one output token. TBT = the gaps between consecutive token times of a request.
  End-to-end latency = finish_s - arrival_s; normalized latency = that / output_tokens.
  Undefined values are NaN and are left out of statistics; unfinished requests are left out
  of every latency statistic.
- Percentiles use ``numpy.percentile`` with ``method="linear"`` (Hyndman and Fan type 7) over
  the defined values; with none, every statistic is NaN and ``count`` is 0.
- An SLO is met when every bound it sets holds; a request that did not finish, or has no first
  token while a TTFT bound is set, misses it; a one-token request has no TPOT and passes a TPOT
  bound. SLO attainment = requests meeting it / requests that arrived in the window (so
  unfinished ones count against it). Goodput = finished requests meeting it per second.
- The window defaults to [first arrival, last arrival or finish]. Throughput counts requests finishing in
  the window and their output and prefill tokens, divided by the window's length (with token
  records, output tokens are the tokens generated in the window).
- Advisory lead = arrival_s - advisory_s (negative for a late advisory; NaN without one).
- Redundant-token fraction = recomputed history tokens / all prefilled tokens, overall and per
  turn index.
- Per-node load and memory are step functions: a node's value at time t is its latest sample at
  or before t (sample and hold). Timelines sample them on a grid of ``bin_s``; load imbalance at
  a grid time is max / median over nodes (NaN where the median is 0 or a node has no sample
  yet).
- A transfer of a session's K,V is assumed to progress linearly from start_s to end_s; the part
  done before its request arrived is bytes * clip((arrival - start) / (end - start), 0, 1).
  Transfers for no request (``request_id = -1``, e.g. after a false advisory) are wasted bytes.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import ClassVar

import numpy as np

PERCENTILES = (50, 90, 99)


def _col(dtype: str, unit: str, doc: str, *, minimum: float | None = None,
         nan: bool = False):
    """A column: its dtype, unit and meaning; values >= ``minimum``; floats finite unless
    ``nan`` allows NaN (for "never" or "none")."""
    return dataclasses.field(metadata={"dtype": np.dtype(dtype), "unit": unit, "doc": doc,
                                       "minimum": minimum, "nan": nan})


class _Table:
    """A frozen dataclass of equal-length 1-D columns, with checks and CSV/JSON round trips."""

    name: ClassVar[str]

    def __post_init__(self):
        n = None
        for f in dataclasses.fields(self):
            raw = np.asarray(getattr(self, f.name))
            dtype = f.metadata["dtype"]
            if raw.ndim != 1 or (n is not None and len(raw) != n):
                raise ValueError(f"{self.name}.{f.name}: expected a 1-D array of length "
                                 f"{n if n is not None else 'N'}, got shape {raw.shape}")
            n = len(raw)
            if dtype.kind in "iu" and raw.dtype.kind == "f" and np.any(raw != np.round(raw)):
                self._fail(f.name, np.flatnonzero(raw != np.round(raw))[0], raw, "an integer")
            try:
                column = raw.astype(dtype)
            except ValueError as e:
                raise ValueError(f"{self.name}.{f.name}: expected {dtype} values ({e})") from None
            column.flags.writeable = False
            object.__setattr__(self, f.name, column)
            if dtype.kind == "f":
                bad = ~np.isfinite(column)
                if f.metadata["nan"]:
                    bad &= ~np.isnan(column)
                self._require(f.name, bad,
                              "a finite number" + (" or NaN" if f.metadata["nan"] else ""))
            if f.metadata["minimum"] is not None:
                self._require(f.name, column < f.metadata["minimum"],
                              f"a value >= {f.metadata['minimum']}")
        self._validate()

    def _fail(self, field: str, index: int, values: np.ndarray, expected: str) -> None:
        raise ValueError(f"{self.name}.{field}[{int(index)}]={values[index].item()!r}: expected "
                         f"{expected}")

    def _require(self, field: str, bad: np.ndarray, expected: str) -> None:
        if np.any(bad):
            self._fail(field, np.flatnonzero(bad)[0], getattr(self, field), expected)

    def _validate(self) -> None:
        """Checks between columns; subclasses extend."""

    def __len__(self) -> int:
        return len(getattr(self, dataclasses.fields(self)[0].name))

    @classmethod
    def schema(cls) -> list[dict[str, str]]:
        """Name, dtype, unit and meaning of each column."""
        return [{"name": f.name, "dtype": str(f.metadata["dtype"]), "unit": f.metadata["unit"],
                 "doc": f.metadata["doc"]} for f in dataclasses.fields(cls)]

    def columns(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_csv(self, path: str | os.PathLike) -> None:
        write_table(path, self.columns())

    @classmethod
    def from_csv(cls, path: str | os.PathLike):
        return cls(**read_csv_table(path, [f.name for f in dataclasses.fields(cls)]))

    def to_json(self, path: str | os.PathLike) -> None:
        write_table(path, self.columns())

    @classmethod
    def from_json(cls, path: str | os.PathLike):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(data, dict) or set(data) != set(names):
            raise ValueError(f"{path}: expected an object with the keys {names}")
        return cls(**{k: np.asarray([np.nan if v is None else v for v in data[k]])
                      for k in names})


@dataclasses.dataclass(frozen=True, eq=False)
class RequestRecords(_Table):
    """One row per request (R rows)."""

    name: ClassVar[str] = "RequestRecords"
    request_id: np.ndarray = _col("i8", "", "unique id of the request")
    session_id: np.ndarray = _col("i8", "", "session it belongs to")
    turn_index: np.ndarray = _col("i8", "", "0-based turn of the session", minimum=0)
    node: np.ndarray = _col("i8", "", "node that served it; -1: never placed", minimum=-1)
    arrival_s: np.ndarray = _col("f8", "s", "when the request reached the system")
    advisory_s: np.ndarray = _col("f8", "s", "when its first advisory arrived; NaN: none", nan=True)
    first_token_s: np.ndarray = _col("f8", "s", "first output token produced; NaN: none", nan=True)
    finish_s: np.ndarray = _col("f8", "s", "last output token produced; NaN: never", nan=True)
    input_tokens: np.ndarray = _col("i8", "tokens", "prompt: session history plus new input",
                                    minimum=0)
    output_tokens: np.ndarray = _col("i8", "tokens", "tokens generated (so far, if unfinished)",
                                     minimum=0)
    prefill_tokens: np.ndarray = _col("i8", "tokens", "prompt tokens computed, all passes",
                                      minimum=0)
    recomputed_tokens: np.ndarray = _col("i8", "tokens", "of those, history tokens recomputed",
                                         minimum=0)

    def _validate(self) -> None:
        first, finish = self.first_token_s, self.finish_s
        self._require("request_id", np.diff(np.sort(self.request_id)) == 0, "unique ids")
        self._require("first_token_s", first < self.arrival_s, ">= arrival_s (or NaN)")
        self._require("finish_s", ~np.isnan(finish) & ~(finish >= first),
                      ">= first_token_s, which must be set (or NaN)")
        self._require("output_tokens", ~np.isnan(first) & (self.output_tokens < 1),
                      ">= 1 once the first token exists")
        self._require("recomputed_tokens", self.recomputed_tokens > self.prefill_tokens,
                      "<= prefill_tokens")

    @property
    def finished(self) -> np.ndarray:
        return ~np.isnan(self.finish_s)


@dataclasses.dataclass(frozen=True, eq=False)
class TokenRecords(_Table):
    """One row per generated output token (K rows), any order."""

    name: ClassVar[str] = "TokenRecords"
    request_id: np.ndarray = _col("i8", "", "request that generated it")
    time_s: np.ndarray = _col("f8", "s", "when it was produced")


@dataclasses.dataclass(frozen=True, eq=False)
class StepRecords(_Table):
    """One row per sample of a node's state (S rows), e.g. after each engine step."""

    name: ClassVar[str] = "StepRecords"
    time_s: np.ndarray = _col("f8", "s", "when the sample was taken")
    node: np.ndarray = _col("i8", "", "node index", minimum=0)
    load: np.ndarray = _col("f8", "", "the load being balanced, e.g. requests running + queued",
                             minimum=0)
    device_bytes: np.ndarray = _col("i8", "bytes", "K,V held in device memory", minimum=0)
    host_bytes: np.ndarray = _col("i8", "bytes", "K,V held in host memory", minimum=0)


@dataclasses.dataclass(frozen=True, eq=False)
class TransferRecords(_Table):
    """One row per K,V transfer (migration or load) of a session (M rows)."""

    name: ClassVar[str] = "TransferRecords"
    session_id: np.ndarray = _col("i8", "", "session whose K,V moves")
    request_id: np.ndarray = _col("i8", "", "request it prepares; -1: none followed")
    src_node: np.ndarray = _col("i8", "", "source node; -1: the destination's host memory",
                               minimum=-1)
    dst_node: np.ndarray = _col("i8", "", "destination node", minimum=0)
    bytes: np.ndarray = _col("i8", "bytes", "size", minimum=0)
    start_s: np.ndarray = _col("f8", "s", "when it started")
    end_s: np.ndarray = _col("f8", "s", "when it completed; NaN: never", nan=True)

    def _validate(self) -> None:
        self._require("end_s", self.end_s < self.start_s, ">= start_s (or NaN)")


# ---------------------------------------------------------------- per-request latencies


def ttft_s(r: RequestRecords) -> np.ndarray:
    """f64[R]: time to first token; NaN without a first token."""
    return r.first_token_s - r.arrival_s


def tpot_s(r: RequestRecords) -> np.ndarray:
    """f64[R]: time per output token after the first; NaN if unfinished or one token."""
    decode = np.where(r.finished & (r.output_tokens > 1), r.output_tokens - 1, np.nan)
    return (r.finish_s - r.first_token_s) / decode


def e2e_latency_s(r: RequestRecords) -> np.ndarray:
    """f64[R]: arrival to finish; NaN if unfinished."""
    return r.finish_s - r.arrival_s


def normalized_latency_s(r: RequestRecords) -> np.ndarray:
    """f64[R]: end-to-end latency per output token; NaN if unfinished."""
    return e2e_latency_s(r) / np.where(r.output_tokens > 0, r.output_tokens, np.nan)


def advisory_lead_s(r: RequestRecords) -> np.ndarray:
    """f64[R]: how long before its arrival the request's first advisory came (negative: late);
    NaN without an advisory."""
    return r.arrival_s - r.advisory_s


def tbt_s(tokens: TokenRecords) -> np.ndarray:
    """f64: gaps between consecutive tokens of each request (K - requests values).

    Records already grouped by request in time order (as an executor appends them) are used
    as they are; others are sorted first.
    """
    ids, times = tokens.request_id, tokens.time_s
    same = ids[1:] == ids[:-1]
    gaps = np.diff(times)
    if np.any(ids[1:] < ids[:-1]) or np.any(same & (gaps < 0)):
        order = np.lexsort((times, ids))
        ids, times = ids[order], times[order]
        same, gaps = ids[1:] == ids[:-1], np.diff(times)
    return gaps[same]


def distribution(values: np.ndarray, percentiles=PERCENTILES) -> dict[str, float]:
    """count, mean and percentiles of the non-NaN values (NaN statistics if there are none)."""
    values = np.asarray(values, np.float64)
    values = values[~np.isnan(values)]
    stats = {"count": float(len(values)), "mean": float(values.mean()) if len(values) else math.nan}
    points = np.percentile(values, percentiles, method="linear") if len(values) else \
        np.full(len(percentiles), np.nan)
    stats.update({f"p{q:g}": float(v) for q, v in zip(percentiles, points)})
    return stats


# ---------------------------------------------------------------- SLOs and throughput


@dataclasses.dataclass(frozen=True)
class SLO:
    """Latency bounds in seconds; None leaves a metric unbounded."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None
    normalized_s: float | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and (isinstance(value, bool) or not value > 0):
                raise ValueError(f"SLO.{f.name}={value!r}: expected a number > 0 or None")


def meets_slo(r: RequestRecords, slo: SLO) -> np.ndarray:
    """bool[R]: finished and within every bound ``slo`` sets (module docstring)."""
    ok = r.finished.copy()
    for bound, value in ((slo.ttft_s, ttft_s(r)), (slo.e2e_s, e2e_latency_s(r)),
                         (slo.normalized_s, normalized_latency_s(r))):
        if bound is not None:
            ok &= value <= bound
    if slo.tpot_s is not None:
        ok &= ~(tpot_s(r) > slo.tpot_s)  # NaN (one token) passes
    return ok


def default_window(r: RequestRecords) -> tuple[float, float]:
    """[first arrival, last arrival or finish]; (NaN, NaN) without requests."""
    if not len(r):
        return math.nan, math.nan
    last_finish = np.nanmax(r.finish_s, initial=-np.inf)
    return float(r.arrival_s.min()), float(max(r.arrival_s.max(), last_finish))


def _in(times: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    return (times >= window[0]) & (times <= window[1])


def throughput(r: RequestRecords, window: tuple[float, float] | None = None,
               tokens: TokenRecords | None = None, slo: SLO | None = None) -> dict[str, float]:
    """Requests, output and prefill tokens per second in the window (and goodput if ``slo``)."""
    window = default_window(r) if window is None else window
    duration = window[1] - window[0]
    done = r.finished & _in(r.finish_s, window)
    per_s = lambda amount: float(amount) / duration if duration > 0 else math.nan
    output = np.sum(_in(tokens.time_s, window)) if tokens is not None else \
        r.output_tokens[done].sum()
    result = {"window_s": float(duration), "requests_per_s": per_s(done.sum()),
              "output_tokens_per_s": per_s(output),
              "prefill_tokens_per_s": per_s(r.prefill_tokens[done].sum())}
    if slo is not None:
        result["goodput_requests_per_s"] = per_s(np.sum(done & meets_slo(r, slo)))
    return result


def slo_attainment(r: RequestRecords, slo: SLO,
                   window: tuple[float, float] | None = None) -> float:
    """Share of the requests arriving in the window that meet ``slo`` (NaN if none arrived)."""
    window = (-math.inf, math.inf) if window is None else window
    arrived = _in(r.arrival_s, window)
    return float(meets_slo(r, slo)[arrived].mean()) if arrived.any() else math.nan


# ---------------------------------------------------------------- redundancy


def redundant_fraction(r: RequestRecords) -> float:
    """Recomputed history tokens / all prefilled tokens (NaN if nothing was prefilled)."""
    prefill = r.prefill_tokens.sum()
    return float(r.recomputed_tokens.sum() / prefill) if prefill else math.nan


def redundant_by_turn(r: RequestRecords) -> dict[str, np.ndarray]:
    """Per turn index present: requests, prefilled and recomputed tokens, and their ratio."""
    turns, index = np.unique(r.turn_index, return_inverse=True)
    prefill = np.bincount(index, r.prefill_tokens, len(turns))
    recomputed = np.bincount(index, r.recomputed_tokens, len(turns))
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.where(prefill > 0, recomputed / prefill, np.nan)
    return {"turn_index": turns, "requests": np.bincount(index, minlength=len(turns)),
            "prefill_tokens": prefill.astype(np.int64),
            "recomputed_tokens": recomputed.astype(np.int64), "redundant_fraction": fraction}


# ---------------------------------------------------------------- nodes over time


def node_timeline(steps: StepRecords, column: str, bin_s: float,
                  window: tuple[float, float] | None = None) -> dict[str, np.ndarray]:
    """A step column sampled and held on a grid: ``time_s`` f64[B] and ``value`` f64[B, N].

    Nodes are 0..max(node); a node with no sample at or before a grid time has NaN there.
    """
    if not bin_s > 0:
        raise ValueError(f"node_timeline.bin_s={bin_s!r}: expected a number > 0")
    num_nodes = int(steps.node.max()) + 1 if len(steps) else 0
    if window is None:
        window = (float(steps.time_s.min()), float(steps.time_s.max())) if len(steps) else (0, 0)
    grid = window[0] + bin_s * np.arange(int(np.floor((window[1] - window[0]) / bin_s)) + 1)
    values = np.full((len(grid), num_nodes), np.nan)
    order = np.lexsort((steps.time_s, steps.node))
    node, times = steps.node[order], steps.time_s[order]
    series = np.asarray(getattr(steps, column), np.float64)[order]
    bounds = np.searchsorted(node, np.arange(num_nodes + 1))
    for n in range(num_nodes):  # one vectorised lookup per node
        t, v = times[bounds[n]:bounds[n + 1]], series[bounds[n]:bounds[n + 1]]
        latest = np.searchsorted(t, grid, side="right") - 1
        values[:, n] = np.where(latest >= 0, v[np.maximum(latest, 0)], np.nan)
    return {"time_s": grid, "value": values}


def imbalance(load: np.ndarray) -> np.ndarray:
    """f64[B]: max / median load over nodes at each grid time (rows of ``load`` f64[B, N])."""
    if load.shape[1] == 0:
        return np.full(load.shape[0], np.nan)
    complete = ~np.isnan(load).any(axis=1)
    median = np.median(np.where(complete[:, None], load, 0.0), axis=1)
    peak = np.max(np.where(complete[:, None], load, 0.0), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(complete & (median > 0), peak / median, np.nan)


# ---------------------------------------------------------------- migrations


def transfer_progress(t: TransferRecords, r: RequestRecords) -> np.ndarray:
    """f64[M]: share of each transfer done when its request arrived (linear progress).

    NaN for a transfer without a known request; for one that never completed, 0 if its request
    arrived before it started, else NaN (its rate is unknown).
    """
    arrival = _arrival_of(t.request_id, r)
    duration = t.end_s - t.start_s
    with np.errstate(invalid="ignore", divide="ignore"):
        linear = np.clip((arrival - t.start_s) / duration, 0.0, 1.0)
    share = np.where(duration > 0, linear, np.where(arrival >= t.end_s, 1.0, 0.0))
    unfinished = np.where(arrival <= t.start_s, 0.0, np.nan)
    return np.where(np.isnan(arrival), np.nan, np.where(np.isnan(t.end_s), unfinished, share))


def _arrival_of(request_id: np.ndarray, r: RequestRecords) -> np.ndarray:
    """f64: arrival time of each given request id; NaN where no such request."""
    if not len(r):
        return np.full(len(request_id), np.nan)
    order = np.argsort(r.request_id)
    ids = r.request_id[order]
    at = np.minimum(np.searchsorted(ids, request_id), len(ids) - 1)
    return np.where(ids[at] == request_id, r.arrival_s[order][at], np.nan)


def migration_summary(t: TransferRecords, r: RequestRecords) -> dict[str, float]:
    """Transfers, bytes, wasted bytes, and how much was done before requests arrived."""
    share = transfer_progress(t, r)
    known = ~np.isnan(share)
    served_bytes = t.bytes[known].sum()
    completed = ~np.isnan(t.end_s)
    return {
        "transfers": float(len(t)), "bytes": float(t.bytes.sum()),
        "wasted_bytes": float(t.bytes[t.request_id < 0].sum()),
        "completed_transfers": float(completed.sum()),
        "bytes_done_before_arrival_fraction":
            float(np.sum(t.bytes[known] * share[known]) / served_bytes) if served_bytes
            else math.nan,
        "transfers_done_before_arrival_fraction":
            float(np.mean(share[known] == 1.0)) if known.any() else math.nan,
        "mean_transfer_s": float(np.mean((t.end_s - t.start_s)[completed]))
        if completed.any() else math.nan,
    }


# ---------------------------------------------------------------- summary and tables


def summarize(requests: RequestRecords, *, tokens: TokenRecords | None = None,
              steps: StepRecords | None = None, transfers: TransferRecords | None = None,
              slo: SLO | None = None, window: tuple[float, float] | None = None,
              bin_s: float = 1.0) -> dict[str, float]:
    """Every metric as a flat ``{name: value}`` (latency statistics over finished requests
    that arrived in the window)."""
    window = default_window(requests) if window is None else window
    arrived = _in(requests.arrival_s, window)
    r = requests
    out = {"requests": float(arrived.sum()), "finished": float(np.sum(arrived & r.finished))}
    for name, values in (("ttft_s", ttft_s(r)), ("tpot_s", tpot_s(r)),
                         ("e2e_latency_s", e2e_latency_s(r)),
                         ("normalized_latency_s", normalized_latency_s(r)),
                         ("advisory_lead_s", advisory_lead_s(r))):
        out.update(_prefixed(name, distribution(values[arrived])))
    if tokens is not None:
        out.update(_prefixed("tbt_s", distribution(tbt_s(tokens))))
    out.update(_prefixed("throughput", throughput(r, window, tokens, slo)))
    if slo is not None:
        out["slo_attainment"] = slo_attainment(r, slo, window)
    out["redundant_fraction"] = redundant_fraction(r)
    if steps is not None and len(steps):
        load = node_timeline(steps, "load", bin_s)["value"]
        out.update(_prefixed("load_imbalance", distribution(imbalance(load))))
        for column in ("device_bytes", "host_bytes"):
            total = np.nansum(node_timeline(steps, column, bin_s)["value"], axis=1)
            out[f"{column}.peak_node"] = float(getattr(steps, column).max())
            out[f"{column}.peak_total"] = float(total.max())
    if transfers is not None:
        out.update(_prefixed("migration", migration_summary(transfers, r)))
    return out


def _prefixed(prefix: str, values: Mapping[str, float]) -> dict[str, float]:
    return {f"{prefix}.{k}": v for k, v in values.items()}


def format_summary(summary: Mapping[str, float]) -> str:
    """A two-column text table of a summary (units are in the names: _s seconds)."""
    width = max((len(name) for name in summary), default=0)
    return "\n".join(f"{name:<{width}}  {'-' if math.isnan(value) else f'{value:.6g}':>12}"
                     for name, value in summary.items())


def print_summary(summary: Mapping[str, float]) -> None:
    print(format_summary(summary))


def write_table(path: str | os.PathLike, columns: Mapping[str, np.ndarray]) -> None:
    """Write equal-length 1-D columns as CSV or JSON, by the file's suffix."""
    arrays = {name: np.asarray(values) for name, values in columns.items()}
    lengths = {len(a) for a in arrays.values()}
    if len(lengths) > 1 or any(a.ndim != 1 for a in arrays.values()):
        raise ValueError(f"{path}: expected equal-length 1-D columns")
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix == ".csv":
        text = [a.astype(str) for a in arrays.values()]
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")  # quotes cells with commas
            writer.writerow(arrays)
            writer.writerows(zip(*text))
    elif suffix == ".json":
        data = {name: [None if isinstance(v, float) and math.isnan(v) else v
                       for v in a.tolist()] for name, a in arrays.items()}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f)
    else:
        raise ValueError(f"{path}: expected a .csv or .json file")


def read_csv_table(path: str | os.PathLike, names: list[str]) -> dict[str, np.ndarray]:
    """The named columns (as strings) of a CSV written by ``write_table``."""
    with open(path, encoding="utf-8", newline="") as f:
        lines = list(csv.reader(f))
    header = lines[0] if lines else []
    if sorted(header) != sorted(names):
        raise ValueError(f"{path}:1: expected the columns {names}, got {header}")
    cells = lines[1:]
    for number, row in enumerate(cells, start=2):
        if len(row) != len(header):
            raise ValueError(f"{path}:{number}: expected {len(header)} fields, got {len(row)}")
    table = np.asarray(cells, dtype=str).reshape(len(cells), len(header))
    return {name: table[:, header.index(name)] for name in names}
