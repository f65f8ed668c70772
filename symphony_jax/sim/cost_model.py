"""The simulator's cost model: how long one engine step takes, given its batch.

A step is described per slot by two integer vectors of one shape ``[..., R]``: ``query_lens``
(tokens the slot computes this step; 0: not in the batch) and ``context_lens`` (its tokens
already cached before the step). Prefill and decode are the same rule: a decode is a query of
one token. A cost model's ``step_time(query_lens, context_lens)`` is written in ``jax.numpy``
(float32, vectorised over slots and any leading axes, no control flow on values) so that the
simulator can call it inside ``jax.lax.while_loop``; a step that schedules nothing takes 0 s.
Cost models are frozen, hashable dataclasses: they pass to ``jax.jit`` as static arguments.

Two host costs outside a step come with every model, as fields: ``admission_s``, the seconds of
host work to take in one request (the simulator adds them to its node's clock before the step
that admits it), and ``report_s``, the delay from a step's end until the host has read its
tokens (an engine reads a step's outputs after dispatching the next one: the simulator reports
first tokens and finishes that much after the step).

Two models:

- ``Roofline``: data-sheet peaks (``hardware.GPU``) scaled by efficiency factors — a step takes
  ``max(FLOPs / (peak x compute_efficiency), bytes / (bandwidth x memory_efficiency))`` plus a
  fixed overhead. One factor per resource suffices: prefill binds on compute, decode on memory,
  and the max picks the binding one for a mixed batch, so separate prefill and decode factors
  would only re-state which resource binds.
- ``Calibrated``: a non-negative linear model over the roofline's terms (``FEATURES``), fitted
  (``fit``) to step times measured on a real engine (``experiments/bench/step_profile.py``).
  Given the engine's scheduler limits it counts a step's sequences and tokens as the engine
  runs them, padded to its shape buckets (``scheduler.batch.shape``): padding runs the layers
  like real tokens, and a step of 65 tokens costs what one of 128 does.

Counting conventions (``Geometry``): a matrix product of ``[T, a] @ [a, b]`` is ``2Tab`` FLOPs;
the projections and MLP run for every query token, the output projection (logits) once per
scheduled sequence (the engine computes only each sequence's last token's logits); causal
attention of a query of q tokens after c cached ones scores ``q(c + (q + 1) / 2)`` query-key
pairs, 4 FLOPs per pair and head dimension (``QK^T`` and ``PV``). A step reads the weights once,
reads the K,V of every scheduled slot's context and query tokens, and writes its query tokens'.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from symphony_jax.config import ModelConfig, SchedulerConfig, _check_ints, _fail
from symphony_jax.scheduler.batch import SMALLEST_TOKEN_BUCKET
from symphony_jax.sim.hardware import GPU

f32 = jnp.float32


def _lens(query_lens, context_lens) -> tuple[jax.Array, jax.Array, jax.Array]:
    """float32 query and context lengths (context 0 where not scheduled) and the scheduled
    mask. Cast before any product: token counts multiply past int32."""
    q, c = jnp.asarray(query_lens), jnp.asarray(context_lens)
    if q.shape != c.shape:
        raise ValueError(f"context_lens: shape {c.shape}, expected query_lens' shape {q.shape}")
    scheduled = q > 0
    return q.astype(f32), jnp.where(scheduled, c.astype(f32), 0), scheduled


def _growing(term, query_lens, context_lens, steps: int) -> jax.Array:
    """f32[steps, ...]: ``term(query_lens, context)`` over ``steps`` steps that each compute
    ``query_lens`` (i32[R]), the context growing by them every step. Every term of the cost
    models is affine in the context for fixed query lengths (sums of ``q * c`` and ``c``), so
    two evaluations give them all."""
    q = jnp.asarray(query_lens)
    first, second = term(q, context_lens), term(q, jnp.asarray(context_lens) + q)
    j = jnp.arange(steps, dtype=f32).reshape((steps,) + (1,) * first.ndim)
    return first + j * (second - first)


def _bucket(count: jax.Array, limit: int, smallest: int = 1) -> jax.Array:
    """``scheduler.batch.bucket`` in ``jax.numpy``: the smallest power of two >= ``count`` and
    ``smallest``, at most ``limit``."""
    x = jnp.clip(count, max(smallest, 1), limit).astype(jnp.int32)
    return jnp.minimum(jnp.left_shift(jnp.int32(1), 32 - jax.lax.clz(x - 1)), limit)


def padded_counts(query_lens, limits: SchedulerConfig | None = None):
    """(sequences, tokens), f32[...] each: what a step computes — as scheduled, or with
    ``limits`` padded to the engine's shape bucket (``scheduler.batch.shape``). 0 for a step
    that schedules nothing."""
    q = jnp.asarray(query_lens)
    seqs, tokens = (q > 0).sum(-1), q.sum(-1)
    if limits is not None:
        busy = seqs > 0
        padded_seqs = _bucket(seqs, limits.max_num_seqs)
        padded_tokens = jnp.where(
            (q <= 1).all(-1), padded_seqs,
            _bucket(jnp.maximum(tokens, padded_seqs), limits.max_num_batched_tokens,
                    SMALLEST_TOKEN_BUCKET))
        seqs, tokens = jnp.where(busy, padded_seqs, 0), jnp.where(busy, padded_tokens, 0)
    return seqs.astype(f32), tokens.astype(f32)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """What the cost of a step depends on in a model (``Geometry.of(model_config)``)."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    dtype_bytes: int

    def __post_init__(self):
        _check_ints(self, 1, *(f.name for f in dataclasses.fields(self)))

    @classmethod
    def of(cls, config: ModelConfig) -> Geometry:
        if not isinstance(config, ModelConfig):
            raise ValueError(f"Geometry.of: config={config!r}, expected a ModelConfig")
        return cls(config.num_layers, config.hidden_size, config.intermediate_size,
                   config.num_heads, config.num_kv_heads, config.head_dim, config.vocab_size,
                   config.jnp_dtype.itemsize)

    @property
    def _layer_matrix_params(self) -> int:
        """Weights of one layer's matrices: q, k, v, o projections; gate, up, down."""
        h, q = self.hidden_size, self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        return h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size

    @property
    def layer_flops_per_token(self) -> int:
        """FLOPs of every layer's matrix products for one query token."""
        return 2 * self.num_layers * self._layer_matrix_params

    @property
    def logits_flops(self) -> int:
        """FLOPs of the output projection for one token (once per scheduled sequence)."""
        return 2 * self.hidden_size * self.vocab_size

    @property
    def linear_flops_per_token(self) -> int:
        """FLOPs of the matrix products for a token whose logits are computed: 2 x the
        parameters it touches (projections, MLP, output projection)."""
        return self.layer_flops_per_token + self.logits_flops

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights a step reads: every layer (norms included), the final norm and the
        output projection. The input embedding is gathered row by row, not read whole."""
        per_layer = self._layer_matrix_params + 2 * self.hidden_size
        params = (self.num_layers * per_layer + self.hidden_size
                  + self.hidden_size * self.vocab_size)
        return params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V of one token across all layers (``ModelConfig.kv_bytes_per_token``)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def linear_flops(self, query_lens, limits: SchedulerConfig | None = None) -> jax.Array:
        """f32[...]: FLOPs of a step's matrix products (``query_lens``: ``[..., R]``); with
        ``limits``, of its padded batch (``padded_counts``)."""
        seqs, tokens = padded_counts(query_lens, limits)
        return tokens * float(self.layer_flops_per_token) + seqs * float(self.logits_flops)

    def attention_flops(self, query_lens, context_lens) -> jax.Array:
        """f32[...]: FLOPs of a step's causal attention."""
        q, c, _ = _lens(query_lens, context_lens)
        pairs = (q * (c + (q + 1) / 2)).sum(-1)
        return pairs * float(4 * self.num_layers * self.num_heads * self.head_dim)

    def kv_bytes(self, query_lens, context_lens) -> jax.Array:
        """f32[...]: bytes of K,V a step moves: each scheduled slot's context and query tokens
        read, its query tokens written."""
        q, c, _ = _lens(query_lens, context_lens)
        return (c + 2 * q).sum(-1) * float(self.kv_bytes_per_token)


def _check_fraction(obj: Any, *fields: str) -> None:
    for field in fields:
        value = getattr(obj, field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            _fail(obj, field, value, "a number in (0, 1]")


def _check_seconds(obj: Any, *fields: str) -> None:
    for field in fields:
        value = getattr(obj, field)
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not 0 <= value < float("inf")):
            _fail(obj, field, value, "a finite number >= 0")


def _check_type(obj: Any, field: str, cls: type) -> None:
    if not isinstance(getattr(obj, field), cls):
        _fail(obj, field, getattr(obj, field), f"a {cls.__name__}")


@dataclasses.dataclass(frozen=True)
class Roofline:
    """Step time from data-sheet peaks: ``max(compute_time, memory_time) + overhead_s``.

    Defaults: dense prefill reaches about half of the tensor-core peak in serving engines,
    decode about three quarters of HBM bandwidth; ``overhead_s`` is the per-step work outside
    the kernels (scheduling, launches, sampling, host reads). ``admission_s`` and ``report_s``
    (see the module doc) are 0: a data sheet says nothing of them; calibrate to learn them.
    """

    geometry: Geometry
    gpu: GPU
    compute_efficiency: float = 0.55
    memory_efficiency: float = 0.75
    overhead_s: float = 300e-6
    admission_s: float = 0.0
    report_s: float = 0.0

    def __post_init__(self):
        _check_type(self, "geometry", Geometry)
        _check_type(self, "gpu", GPU)
        _check_fraction(self, "compute_efficiency", "memory_efficiency")
        _check_seconds(self, "overhead_s", "admission_s", "report_s")

    def compute_time(self, query_lens, context_lens) -> jax.Array:
        """f32[...]: seconds of the step's FLOPs at the effective peak."""
        g = self.geometry
        flops = g.linear_flops(query_lens) + g.attention_flops(query_lens, context_lens)
        return flops / (self.gpu.peak_flops * self.compute_efficiency)

    def memory_time(self, query_lens, context_lens) -> jax.Array:
        """f32[...]: seconds of the step's weight and K,V traffic at the effective bandwidth."""
        g = self.geometry
        moved = float(g.weight_bytes) + g.kv_bytes(query_lens, context_lens)
        return moved / (self.gpu.hbm_bandwidth * self.memory_efficiency)

    def step_time(self, query_lens, context_lens) -> jax.Array:
        """f32[...]: seconds of a step (0 if it schedules nothing)."""
        busy = jnp.maximum(self.compute_time(query_lens, context_lens),
                           self.memory_time(query_lens, context_lens)) + self.overhead_s
        return jnp.where((jnp.asarray(query_lens) > 0).any(-1), busy, 0).astype(f32)

    def run_times(self, query_lens, context_lens, steps: int) -> jax.Array:
        """f32[steps]: ``step_time`` of ``steps`` steps that each compute ``query_lens``
        (i32[R]), the context growing by them every step."""
        busy = jnp.maximum(_growing(self.compute_time, query_lens, context_lens, steps),
                           _growing(self.memory_time, query_lens, context_lens, steps))
        return jnp.where((jnp.asarray(query_lens) > 0).any(), busy + self.overhead_s,
                         0).astype(f32)


# ------------------------------------------------------------------------- calibrated model

# The terms of a roofline, each with a coefficient in seconds per unit: a step's fixed cost
# (launches, scheduling, sampling, the weights read once); linear-layer FLOPs; sequences
# (per-sequence work that is not FLOPs: layout, logits readback, sampling, a decode kernel's
# per-sequence setup); attention FLOPs; K,V bytes read and written. Linear FLOPs and sequences
# count the padded batch when the engine's limits are given; attention and K,V the real tokens.
FEATURES = ("step", "linear_flop", "sequence", "attention_flop", "kv_byte")


def features(geometry: Geometry, query_lens, context_lens,
             limits: SchedulerConfig | None = None) -> jax.Array:
    """f32[..., len(FEATURES)]: the ``FEATURES`` of steps (all 0 for an empty step)."""
    seqs, _ = padded_counts(query_lens, limits)
    return jnp.stack([(seqs > 0).astype(f32), geometry.linear_flops(query_lens, limits), seqs,
                      geometry.attention_flops(query_lens, context_lens),
                      geometry.kv_bytes(query_lens, context_lens)], axis=-1)


@dataclasses.dataclass(frozen=True)
class Calibrated:
    """Step time as ``features(...) @ coefficients`` (seconds per unit of each of ``FEATURES``,
    all >= 0), fitted by ``fit``; ``fit_error`` is its mean absolute relative error on the
    samples it was fitted to. ``limits``: the measured engine's scheduler limits, to count
    steps as padded to its shape buckets (None: as scheduled). ``admission_s`` and
    ``report_s``: the host costs of the module doc, fitted and measured by ``fit``."""

    geometry: Geometry
    coefficients: tuple[float, ...]
    fit_error: float
    limits: SchedulerConfig | None = None
    admission_s: float = 0.0
    report_s: float = 0.0

    def __post_init__(self):
        _check_type(self, "geometry", Geometry)
        if self.limits is not None:
            _check_type(self, "limits", SchedulerConfig)
        c = self.coefficients
        if (not isinstance(c, tuple) or len(c) != len(FEATURES)
                or not all(isinstance(x, float) and 0 <= x < float("inf") for x in c)):
            _fail(self, "coefficients", c,
                  f"a tuple of {len(FEATURES)} finite floats >= 0 ({', '.join(FEATURES)})")
        if not isinstance(self.fit_error, float) or not self.fit_error >= 0:
            _fail(self, "fit_error", self.fit_error, "a float >= 0")
        _check_seconds(self, "admission_s", "report_s")

    def step_time(self, query_lens, context_lens) -> jax.Array:
        """f32[...]: seconds of a step (0 if it schedules nothing)."""
        x = features(self.geometry, query_lens, context_lens, self.limits)
        # A product and a sum, not a matmul: GPUs run float32 matmuls at reduced precision.
        return (x * jnp.asarray(self.coefficients, f32)).sum(-1)

    def run_times(self, query_lens, context_lens, steps: int) -> jax.Array:
        """f32[steps]: ``step_time`` of ``steps`` steps that each compute ``query_lens``
        (i32[R]), the context growing by them every step."""
        x = _growing(functools.partial(features, self.geometry, limits=self.limits),
                     query_lens, context_lens, steps)
        return (x * jnp.asarray(self.coefficients, f32)).sum(-1)


@dataclasses.dataclass(frozen=True, eq=False)
class StepSamples:
    """Measured engine steps (N steps, R slots), each scheduling at least one token. A step's
    time runs to the next step's scheduling, so it holds the host work between the two: taking
    in the requests the next step admits (``admitted``) among it."""

    query_lens: np.ndarray  # i32[N, R]  tokens each slot computed
    context_lens: np.ndarray  # i32[N, R]  tokens each slot had cached before the step
    seconds: np.ndarray  # f64[N]  the step's wall time
    admitted: np.ndarray | None = None  # i32[N]  requests taken in before the next step
    #                                           (None: 0)
    report_lags: np.ndarray | None = None  # f64[N]  from the step's end until the host read
    #                                              its outputs (nan: unknown; None: all)

    def __post_init__(self):
        q = self._array("query_lens", 2, "i")
        c = self._array("context_lens", 2, "i")
        s = self._array("seconds", 1, "f")
        n = len(s)
        if self.admitted is None:
            object.__setattr__(self, "admitted", np.zeros(n, np.int32))
        if self.report_lags is None:
            object.__setattr__(self, "report_lags", np.full(n, np.nan))
        a = self._array("admitted", 1, "i")
        lags = self._array("report_lags", 1, "f")
        if c.shape != q.shape:
            self._fail("context_lens", f"shape {c.shape}", f"query_lens' shape {q.shape}")
        for name, x in (("seconds", s), ("admitted", a), ("report_lags", lags)):
            if x.shape != q.shape[:1]:
                self._fail(name, f"shape {x.shape}", f"one value per step, shape {q.shape[:1]}")
        for name, x in (("query_lens", q), ("context_lens", c), ("admitted", a)):
            if x.size and not 0 <= x.min() <= x.max() < 2**31:
                self._fail(name, f"values in [{x.min()}, {x.max()}]", "integers in [0, 2**31)")
        empty = ~(q > 0).any(axis=1)
        if empty.any():
            self._fail("query_lens", f"step {int(np.argmax(empty))} schedules nothing",
                       "at least one token scheduled per step")
        bad = ~(np.isfinite(s) & (s > 0))
        if bad.any():
            self._fail("seconds", f"{s[bad][:3].tolist()}", "finite times > 0")
        bad = ~(np.isnan(lags) | (np.isfinite(lags) & (lags >= 0)))
        if bad.any():
            self._fail("report_lags", f"{lags[bad][:3].tolist()}", "finite times >= 0 or nan")
        for name, x in (("query_lens", q.astype(np.int32)), ("context_lens", c.astype(np.int32)),
                        ("seconds", s.astype(np.float64)), ("admitted", a.astype(np.int32)),
                        ("report_lags", lags.astype(np.float64))):
            object.__setattr__(self, name, x)

    @staticmethod
    def _fail(field: str, got: str, expected: str) -> None:
        raise ValueError(f"StepSamples.{field}: {got}, expected {expected}")

    def _array(self, name: str, ndim: int, kind: str) -> np.ndarray:
        """Field ``name`` as an array of ``ndim`` dimensions of integers (``kind`` "i") or
        numbers ("f")."""
        expected = f"a {ndim}-D array of {'integers' if kind == 'i' else 'numbers'}"
        try:
            x = np.asarray(getattr(self, name))
        except (ValueError, TypeError):
            self._fail(name, "ragged or not numbers", expected)
        if x.ndim != ndim or x.dtype.kind not in ("iu" if kind == "i" else "iuf"):
            self._fail(name, f"{x.dtype} of shape {x.shape}", expected)
        return x

    def __len__(self) -> int:
        return len(self.seconds)

    def take(self, index) -> StepSamples:
        """The samples at ``index`` (an integer array or a boolean mask)."""
        return StepSamples(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))


def predicted_seconds(model, samples: StepSamples) -> np.ndarray:
    """f64[N]: a cost model's time of each sample: its step and the admissions after it."""
    step = np.asarray(model.step_time(samples.query_lens, samples.context_lens), np.float64)
    return step + samples.admitted * model.admission_s


def relative_errors(model, samples: StepSamples) -> np.ndarray:
    """f64[N]: |predicted - measured| / measured of a cost model on each sample."""
    return np.abs(predicted_seconds(model, samples) - samples.seconds) / samples.seconds


def _nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin ||a x - b|| over x >= 0, exactly, for a few columns: the optimum is the
    unconstrained least-squares solution on its support, so it is the best of the non-negative
    solutions over every subset of columns (2^n least-squares solves)."""
    n = a.shape[1]
    best, best_residual = np.zeros(n), float(b @ b)
    for size in range(1, n + 1):
        for support in itertools.combinations(range(n), size):
            cols = list(support)
            x_s = np.linalg.lstsq(a[:, cols], b, rcond=None)[0]
            if (x_s < 0).any():
                continue
            residual = float(np.sum((a[:, cols] @ x_s - b) ** 2))
            if residual < best_residual:
                best, best_residual = np.zeros(n), residual
                best[cols] = x_s
    return best


def fit(samples: StepSamples, geometry: Geometry,
        limits: SchedulerConfig | None = None) -> Calibrated:
    """The ``Calibrated`` model of ``geometry`` closest to measured steps (of an engine with
    scheduler ``limits``, to count steps as padded to its shape buckets; None: as scheduled).

    Least squares of *relative* errors (each row divided by its measured time: step times span
    orders of magnitude, and a model should be as good on a decode step as on a long prefill),
    coefficients constrained >= 0 (each is a physical cost), on columns scaled to unit norm.
    ``admission_s`` is fitted with them, as the coefficient of ``samples.admitted``. All are
    then scaled so that the samples' predicted total is their measured total: relative errors
    weigh a fast sample more than a slow one of the same batch, so with noisy times (a shared
    machine) their least squares predict below the mean, and the simulator's latencies are sums
    of step times. ``report_s`` is the mean of the measured ``report_lags`` (0 if none is known).
    """
    if not isinstance(samples, StepSamples):
        raise ValueError(f"fit: samples={type(samples).__name__}, expected a StepSamples")
    if not isinstance(geometry, Geometry):
        raise ValueError(f"fit: geometry={type(geometry).__name__}, expected a Geometry")
    if limits is not None and not isinstance(limits, SchedulerConfig):
        raise ValueError(f"fit: limits={limits!r}, expected a SchedulerConfig or None")
    if len(samples) < len(FEATURES):
        raise ValueError(f"fit: StepSamples.seconds has {len(samples)} samples, expected at "
                         f"least {len(FEATURES)} (one per feature: {', '.join(FEATURES)})")
    x = np.asarray(features(geometry, samples.query_lens, samples.context_lens, limits),
                   np.float64)
    x = np.concatenate([x, samples.admitted[:, None]], axis=1)
    a = x / samples.seconds[:, None]
    scale = np.linalg.norm(a, axis=0)
    scale[scale == 0] = 1.0
    solution = _nnls(a / scale, np.ones(len(samples))) / scale
    *coefficients, admission_s = (solution * samples.seconds.sum() / (x @ solution).sum()).tolist()
    lags = samples.report_lags[~np.isnan(samples.report_lags)]
    model = Calibrated(geometry, tuple(coefficients), 0.0, limits, admission_s,
                       float(lags.mean()) if len(lags) else 0.0)
    return dataclasses.replace(model, fit_error=float(relative_errors(model, samples).mean()))


# ------------------------------------------------------------------------- profiles on disk

PROFILE_KEYS = ("meta", "seconds", "query_lens", "context_lens", "admitted", "report_lags")


def save_profile(path: str | os.PathLike, samples: StepSamples, meta: dict[str, Any]) -> None:
    """Write measured steps and ``meta`` (device, JAX version, date, model, engine config) as
    JSON, one step per line in the length arrays (an unknown report lag as null)."""
    if not isinstance(samples, StepSamples):
        raise ValueError(f"save_profile: samples={type(samples).__name__}, expected a "
                         "StepSamples")
    if not isinstance(meta, dict):
        raise ValueError(f"save_profile: meta={meta!r}, expected a dict")
    rows = lambda x: "[\n" + ",\n".join(f"  {json.dumps(r)}" for r in x.tolist()) + "\n ]"
    lags = [None if np.isnan(v) else v for v in samples.report_lags.tolist()]
    try:
        meta_text = json.dumps(meta, indent=1, sort_keys=True).replace("\n", "\n ")
    except (TypeError, ValueError) as e:
        raise ValueError(f"save_profile: meta is not JSON ({e})") from None
    text = (f'{{\n "meta": {meta_text},\n'
            f' "seconds": {json.dumps(samples.seconds.tolist())},\n'
            f' "query_lens": {rows(samples.query_lens)},\n'
            f' "context_lens": {rows(samples.context_lens)},\n'
            f' "admitted": {json.dumps(samples.admitted.tolist())},\n'
            f' "report_lags": {json.dumps(lags)}\n}}\n')
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def load_profile(path: str | os.PathLike) -> tuple[StepSamples, dict[str, Any]]:
    """The samples and meta of a profile that ``save_profile`` wrote."""
    expected = f"a JSON object with the keys {', '.join(PROFILE_KEYS)} (meta an object)"
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise ValueError(f"profile {os.fspath(path)!r}: cannot read it ({e.strerror})") from None
    except ValueError as e:
        raise ValueError(f"profile {os.fspath(path)!r}: not JSON ({e}); expected {expected}"
                         ) from None
    if (not isinstance(data, dict) or set(data) != set(PROFILE_KEYS)
            or not isinstance(data["meta"], dict)):
        raise ValueError(f"profile {os.fspath(path)!r}: expected {expected}")
    try:
        lags = data["report_lags"]
        if isinstance(lags, list):  # null: unknown
            lags = [np.nan if v is None else v for v in lags]
        samples = StepSamples(data["query_lens"], data["context_lens"], data["seconds"],
                              data["admitted"], lags)
    except ValueError as e:
        raise ValueError(f"profile {os.fspath(path)!r}: {e}") from None
    return samples, data["meta"]
