"""The simulator's cost model against independent references: FLOPs by brute force and by the
model's parameter shapes, rooflines by hand, fits that recover known coefficients."""

import dataclasses
import functools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from symphony_jax.config import MODEL_PRESETS, SchedulerConfig, model_preset
from symphony_jax.model.params import init_params
from symphony_jax.scheduler import batch
from symphony_jax.sim import (GPU, GPUS, Calibrated, Geometry, Roofline, StepSamples,
                              features, fit, gpu, load_profile, padded_counts, relative_errors,
                              save_profile)

TINY = model_preset("tiny")
TINY_GEOMETRY = Geometry.of(TINY)
LLAMA = Geometry.of(model_preset("llama-3.1-8b"))
A100 = Roofline(LLAMA, gpu("A100-80GB"))
# Seconds per unit of each feature (per step, linear FLOP, sequence, attention FLOP, K,V byte),
# each term a sizeable share of the time of ``random_steps`` batches on the tiny model.
TRUE = (1e-3, 7e-12, 2e-4, 2e-12, 2.5e-10)
LIMITS = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=2048, max_model_len=4096)


def random_steps(seed: int, n: int, slots: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random batches from pure decode to pure prefill: each has its own fraction of busy
    slots and of prefill chunks among them (the rest decode); contexts are random."""
    rng = np.random.default_rng(seed)
    busy = rng.random((n, slots)) < rng.random((n, 1))
    busy[:, 0] = True
    prefill = rng.random((n, slots)) < rng.random((n, 1))
    q = np.where(prefill, rng.integers(2, 512, (n, slots)), 1) * busy
    c = rng.integers(0, 2048, (n, slots))
    return q.astype(np.int32), c.astype(np.int32)


def parameter_counts(config) -> tuple[int, int, int]:
    """(matrix weights of all layers, output projection, bytes of all parameters), from the
    shapes of the model's own parameters."""
    params = jax.eval_shape(lambda key: init_params(config, key), jax.random.key(0))
    layers = params.layers
    matrices = sum(np.prod(x.shape) for x in (layers.wq, layers.wk, layers.wv, layers.wo,
                                              layers.w_gate, layers.w_up, layers.w_down))
    output = np.prod(params.embed.shape)  # the same shape as lm_head, transposed
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    return int(matrices), int(output), int(nbytes)


def test_the_simulator_imports_neither_model_nor_engine():
    code = ("import sys, symphony_jax.sim; print(sorted(m for m in sys.modules if "
            "m.startswith(('symphony_jax.model', 'symphony_jax.engine'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"


# ------------------------------------------------------------------------------- geometry


def test_attention_flops_equal_a_loop_over_query_positions():
    q, c = random_steps(0, 6)
    g = TINY_GEOMETRY
    for row in range(len(q)):
        keys = sum(c[row, s] + i + 1 for s in range(q.shape[1]) for i in range(q[row, s]))
        expected = 4 * g.num_layers * g.num_heads * g.head_dim * keys
        assert float(g.attention_flops(q[row], c[row])) == pytest.approx(expected, rel=1e-6)
    rows = np.asarray(g.attention_flops(q, c))  # leading axes are batched
    assert rows.shape == (6,)
    assert rows[3] == pytest.approx(float(g.attention_flops(q[3], c[3])), rel=1e-6)


@pytest.mark.parametrize("name", ["tiny", "smollm2-135m"])
def test_linear_flops_and_weight_bytes_count_the_model_parameters(name):
    config = model_preset(name)
    matrices, output, nbytes = parameter_counts(config)
    g = Geometry.of(config)
    assert g.layer_flops_per_token == 2 * matrices
    assert g.logits_flops == 2 * output
    assert g.linear_flops_per_token == 2 * (matrices + output)
    # A step reads every weight but the input embedding's (untied: a separate table).
    embed = 0 if config.tie_word_embeddings else output * g.dtype_bytes
    assert g.weight_bytes == nbytes - embed
    # Projections and MLP per token, logits per scheduled sequence.
    query = np.array([5, 0, 1, 17], np.int32)
    assert float(g.linear_flops(query)) == pytest.approx(
        23 * 2 * matrices + 3 * 2 * output, rel=1e-6)


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_kv_bytes_per_token_is_the_configs(name):
    config = model_preset(name)
    assert Geometry.of(config).kv_bytes_per_token == config.kv_bytes_per_token()


def test_kv_bytes_read_context_and_query_written_query():
    q, c = np.array([3, 0, 1]), np.array([10, 99, 4])
    assert float(TINY_GEOMETRY.kv_bytes(q, c)) == (10 + 3 + 3 + 4 + 1 + 1) * (
        TINY.kv_bytes_per_token())


def test_padded_counts_are_the_engines_shape_buckets():
    q, _ = random_steps(9, 200)
    q[:20] = np.minimum(q[:20], 1)  # decode-only steps have a bucket of their own
    seqs, tokens = map(np.asarray, padded_counts(q, LIMITS))
    for row in range(len(q)):
        num_seqs, num_tokens = int((q[row] > 0).sum()), int(q[row].sum())
        assert (seqs[row], tokens[row]) == batch.shape(num_seqs, num_tokens,
                                                       bool((q[row] <= 1).all()), LIMITS)
    seqs, tokens = map(np.asarray, padded_counts(q))
    np.testing.assert_array_equal(seqs, (q > 0).sum(-1))
    np.testing.assert_array_equal(tokens, q.sum(-1))
    assert [float(x) for x in padded_counts(np.zeros(4, np.int32), LIMITS)] == [0.0, 0.0]


def test_geometry_rejects_bad_fields():
    with pytest.raises(ValueError, match=r"Geometry\.num_heads=0"):
        dataclasses.replace(TINY_GEOMETRY, num_heads=0)
    with pytest.raises(ValueError, match="expected a ModelConfig"):
        Geometry.of("tiny")


# ------------------------------------------------------------------------------- roofline


def test_small_decode_batch_is_memory_bound_at_the_weights_read():
    g, spec = LLAMA, A100.gpu
    q, c = np.array([1, 1, 0, 1]), np.array([100, 300, 5000, 0])
    moved = g.weight_bytes + (101 + 1 + 301 + 1 + 1 + 1) * g.kv_bytes_per_token
    expected = moved / (spec.hbm_bandwidth * A100.memory_efficiency) + A100.overhead_s
    assert float(A100.step_time(q, c)) == pytest.approx(expected, rel=1e-5)
    assert float(A100.compute_time(q, c)) < float(A100.memory_time(q, c)) / 10
    # The weights dominate: ~15 GB at ~1.5 TB/s effective is ~10 ms.
    assert 8e-3 < expected < 12e-3


def test_long_prefill_is_compute_bound():
    g, spec = LLAMA, A100.gpu
    q, c = np.array([8192, 0]), np.array([0, 0])
    flops = 8192 * g.layer_flops_per_token + g.logits_flops + (
        4 * g.num_layers * g.num_heads * g.head_dim * 8192 * 8193 / 2)
    expected = flops / (spec.peak_flops * A100.compute_efficiency) + A100.overhead_s
    assert float(A100.step_time(q, c)) == pytest.approx(expected, rel=1e-5)
    assert float(A100.memory_time(q, c)) < float(A100.compute_time(q, c)) / 10


def test_empty_step_takes_no_time():
    for model in (A100, Calibrated(TINY_GEOMETRY, TRUE, 0.0),
                  Calibrated(TINY_GEOMETRY, TRUE, 0.0, LIMITS)):
        assert float(model.step_time(np.zeros(4, np.int32), np.full(4, 7, np.int32))) == 0.0


def test_faster_gpu_is_faster():
    q, c = random_steps(1, 20)
    a100 = np.asarray(A100.step_time(q, c))
    h200 = np.asarray(dataclasses.replace(A100, gpu=gpu("H200")).step_time(q, c))
    assert (h200 < a100).all()


lengths = st.lists(st.integers(0, 4096), min_size=4, max_size=4)


@given(q=lengths, c=lengths, slot=st.integers(0, 3), more=st.integers(1, 4096),
       grow_query=st.booleans())
def test_step_time_is_monotone_in_query_and_context(q, c, slot, more, grow_query):
    q, c = np.array(q, np.int32), np.array(c, np.int32)
    q2, c2 = q.copy(), c.copy()
    (q2 if grow_query else c2)[slot] += more
    for model in (A100, Calibrated(TINY_GEOMETRY, TRUE, 0.0),
                  Calibrated(TINY_GEOMETRY, TRUE, 0.0, LIMITS)):
        assert float(model.step_time(q2, c2)) >= float(model.step_time(q, c))


def test_step_time_under_jit_and_while_loop_equals_numpy_input():
    q, c = random_steps(2, 16)
    for model in (A100, Calibrated(TINY_GEOMETRY, TRUE, 0.0, LIMITS)):
        eager = np.asarray(model.step_time(q, c))
        assert eager.dtype == np.float32 and eager.shape == (16,)
        jitted = jax.jit(lambda m, q, c: m.step_time(q, c), static_argnums=0)
        np.testing.assert_allclose(jitted(model, jnp.asarray(q), jnp.asarray(c)), eager,
                                   rtol=1e-6)

        def body(carry):  # the simulator's use: steps summed inside a while loop
            i, total = carry
            return i + 1, total + model.step_time(jnp.asarray(q)[i], jnp.asarray(c)[i])

        _, total = jax.jit(lambda: jax.lax.while_loop(lambda s: s[0] < len(q), body,
                                                      (0, jnp.float32(0))))()
        assert float(total) == pytest.approx(float(eager.sum()), rel=1e-5)


RUN = 24  # steps of a run (one shape: one compilation per model)


@functools.partial(jax.jit, static_argnums=0)
def run_and_one_by_one(model, q, c):
    """``model.run_times`` of RUN steps computing ``q``, and ``step_time`` of each step."""
    steps = jnp.broadcast_to(q, (RUN,) + q.shape), c + jnp.arange(RUN)[:, None] * q
    return model.run_times(q, c, RUN), model.step_time(*steps)


@given(q=st.lists(st.integers(0, 3), min_size=4, max_size=4), c=lengths)
def test_run_times_are_the_step_times_of_a_growing_context(q, c):
    """A run of decode (or fixed-chunk) steps: contexts grow by the query each step."""
    q, c = jnp.array(q, jnp.int32), jnp.array(c, jnp.int32)
    for model in (A100, Calibrated(TINY_GEOMETRY, TRUE, 0.0, LIMITS)):
        np.testing.assert_allclose(*run_and_one_by_one(model, q, c), rtol=1e-5)


def test_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError, match="context_lens: shape"):
        A100.step_time(np.ones(4, np.int32), np.ones(5, np.int32))


def test_roofline_rejects_bad_fields():
    with pytest.raises(ValueError, match=r"Roofline\.compute_efficiency=1\.5"):
        Roofline(LLAMA, gpu("H100-80GB"), compute_efficiency=1.5)
    with pytest.raises(ValueError, match=r"Roofline\.overhead_s=-1"):
        Roofline(LLAMA, gpu("H100-80GB"), overhead_s=-1)
    with pytest.raises(ValueError, match=r"Roofline\.gpu='H100-80GB'"):
        Roofline(LLAMA, "H100-80GB")


# ------------------------------------------------------------------------------- hardware


def test_gpu_specs_are_validated_and_looked_up_by_name():
    assert gpu("H200").memory_bytes == 141e9
    assert all(spec.name == name for name, spec in GPUS.items())
    with pytest.raises(ValueError, match="unknown GPU 'V100': expected one of A100-80GB, "
                                         "H100-80GB, H200"):
        gpu("V100")
    fields = dict(name="x", peak_flops=1e12, hbm_bandwidth=1e12, memory_bytes=1e9,
                  pcie_bandwidth=1e9, nic_bandwidth=1e9)
    GPU(**fields)
    for field in ("peak_flops", "hbm_bandwidth", "memory_bytes", "pcie_bandwidth",
                  "nic_bandwidth"):
        with pytest.raises(ValueError, match=rf"GPU\.{field}=0: expected a number > 0"):
            GPU(**{**fields, field: 0})
    with pytest.raises(ValueError, match=r"GPU\.name=''"):
        GPU(**{**fields, "name": ""})


# ------------------------------------------------------------------------------- calibration


def synthetic(seed: int, n: int, coefficients=TRUE, noise: float = 0.01,
              limits=None, admission_s: float = 0.0) -> StepSamples:
    """Steps timed by ``coefficients`` with relative Gaussian ``noise``; with ``admission_s``,
    some are followed by 1 to 4 admissions, each costing that much, and their report lags are
    0.5 to 1.5 ms (else unknown)."""
    q, c = random_steps(seed, n)
    x = np.asarray(features(TINY_GEOMETRY, q, c, limits), np.float64)
    rng = np.random.default_rng(seed + 1)
    admitted = np.where(rng.random(n) < 0.3, rng.integers(1, 5, n), 0) if admission_s else None
    lags = rng.uniform(0.5e-3, 1.5e-3, n) if admission_s else None
    seconds = (x @ np.asarray(coefficients) + (admitted if admission_s else 0) * admission_s
               ) * (1 + noise * rng.standard_normal(n))
    return StepSamples(q, c, seconds, admitted, lags)


@pytest.mark.parametrize("limits", [None, LIMITS])
def test_fit_recovers_known_coefficients_from_noisy_samples(limits):
    samples = synthetic(3, 300, limits=limits)
    model = fit(samples, TINY_GEOMETRY, limits)
    np.testing.assert_allclose(model.coefficients, TRUE, rtol=0.05)
    assert model.fit_error < 0.012  # 1% Gaussian noise: mean |error| ~ 0.8%
    held_out = synthetic(4, 100, limits=limits)
    assert relative_errors(model, held_out).mean() < 0.012
    assert model.limits == limits
    hash(model)  # a static argument to jax.jit


def test_fit_recovers_the_admission_cost_and_the_mean_report_lag():
    samples = synthetic(3, 300, limits=LIMITS, admission_s=2e-3)
    model = fit(samples, TINY_GEOMETRY, LIMITS)
    np.testing.assert_allclose(model.coefficients, TRUE, rtol=0.05)
    assert model.admission_s == pytest.approx(2e-3, rel=0.05)
    assert model.report_s == pytest.approx(samples.report_lags.mean())
    assert model.fit_error < 0.012
    # Without the admissions, their cost is noise no step feature explains.
    blind = fit(dataclasses.replace(samples, admitted=None), TINY_GEOMETRY, LIMITS)
    assert blind.admission_s == 0.0 and blind.fit_error > 3 * model.fit_error
    # No lag known (a profile of isolated steps): no report delay.
    assert fit(synthetic(3, 300, limits=LIMITS), TINY_GEOMETRY, LIMITS).report_s == 0.0


def test_fit_predicts_the_mean_of_noisy_times():
    """Steps slowed now and then (another process on a shared machine: +0 to +200%, one step
    in five): a fit of relative errors leans toward the fast samples, the scaled fit's total
    is the measured total."""
    samples = synthetic(9, 400, limits=LIMITS, admission_s=2e-3)
    rng = np.random.default_rng(10)
    slowed = samples.seconds * (1 + 2 * rng.random(400) * (rng.random(400) < 0.2))
    noisy = dataclasses.replace(samples, seconds=slowed)
    model = fit(noisy, TINY_GEOMETRY, LIMITS)
    predicted = (np.asarray(model.step_time(noisy.query_lens, noisy.context_lens))
                 + noisy.admitted * model.admission_s)
    assert predicted.sum() == pytest.approx(slowed.sum(), rel=1e-6)
    assert np.median(predicted / samples.seconds) > 1.05  # above the unslowed times


def test_calibrated_with_limits_charges_padding():
    """65 and 128 tokens run in one bucket: only their attention and K,V differ."""
    linear_only = (0.0, 1e-9, 0.0, 0.0, 0.0)
    q65, q128, c = np.array([65, 0]), np.array([128, 0]), np.zeros(2, np.int32)
    padded = Calibrated(TINY_GEOMETRY, linear_only, 0.0, LIMITS)
    assert float(padded.step_time(q65, c)) == float(padded.step_time(q128, c))
    scheduled = Calibrated(TINY_GEOMETRY, linear_only, 0.0)
    assert float(scheduled.step_time(q65, c)) < float(scheduled.step_time(q128, c))


def test_fit_keeps_coefficients_non_negative():
    truth = (TRUE[0], TRUE[1], 0.0, TRUE[3], 0.0)  # no per-sequence or K,V cost
    model = fit(synthetic(5, 200, truth, noise=0.02), TINY_GEOMETRY)
    assert all(v >= 0 for v in model.coefficients)
    np.testing.assert_allclose(np.divide(model.coefficients, TRUE), np.sign(truth), atol=0.05)
    assert model.fit_error < 0.025


def test_fit_rejects_bad_samples():
    q, c = random_steps(6, 10)
    seconds = np.full(10, 1e-3)
    cases = [
        (lambda: StepSamples(q, c[:, :4], seconds), r"StepSamples\.context_lens.*shape"),
        (lambda: StepSamples(q, c, seconds[:9]), r"StepSamples\.seconds.*one value per step"),
        (lambda: StepSamples(q, -c, seconds), r"StepSamples\.context_lens.*\[0, 2\*\*31\)"),
        (lambda: StepSamples(-q, c, seconds), r"StepSamples\.query_lens"),
        (lambda: StepSamples(q, c, np.where(np.arange(10) == 2, np.nan, seconds)),
         r"StepSamples\.seconds.*finite times > 0"),
        (lambda: StepSamples(q.astype(float), c, seconds), r"StepSamples\.query_lens.*integers"),
        (lambda: StepSamples(np.zeros_like(q), c, seconds), r"StepSamples\.query_lens.*step 0"),
        (lambda: StepSamples(q, c, seconds, np.ones(9, int)),
         r"StepSamples\.admitted.*one value per step"),
        (lambda: StepSamples(q, c, seconds, -np.ones(10, int)),
         r"StepSamples\.admitted.*\[0, 2\*\*31\)"),
        (lambda: StepSamples(q, c, seconds, None, np.full(10, -1e-3)),
         r"StepSamples\.report_lags.*finite times >= 0 or nan"),
        (lambda: fit(StepSamples(q[:4], c[:4], seconds[:4]), TINY_GEOMETRY),
         r"StepSamples\.seconds has 4 samples, expected at least 5"),
        (lambda: fit((q, c, seconds), TINY_GEOMETRY), "expected a StepSamples"),
    ]
    for make, message in cases:
        with pytest.raises(ValueError, match=message):
            make()


def test_calibrated_rejects_bad_coefficients():
    with pytest.raises(ValueError, match=r"Calibrated\.coefficients"):
        Calibrated(TINY_GEOMETRY, TRUE[:4], 0.0)
    with pytest.raises(ValueError, match=r"Calibrated\.coefficients"):
        Calibrated(TINY_GEOMETRY, (-1.0, *TRUE[1:]), 0.0)
    with pytest.raises(ValueError, match=r"Calibrated\.limits"):
        Calibrated(TINY_GEOMETRY, TRUE, 0.0, limits=8)
    for field in ("admission_s", "report_s"):
        with pytest.raises(ValueError, match=rf"Calibrated\.{field}=-0\.1: expected a finite"):
            Calibrated(TINY_GEOMETRY, TRUE, 0.0, **{field: -0.1})
        with pytest.raises(ValueError, match=rf"Roofline\.{field}=inf: expected a finite"):
            Roofline(LLAMA, gpu("H100-80GB"), **{field: float("inf")})


# ------------------------------------------------------------------------------- profiles


def test_profile_round_trip(tmp_path):
    samples = synthetic(7, 12, admission_s=1e-3)
    samples.report_lags[::3] = np.nan  # unknown: written as null
    meta = {"device": "cpu", "jax": jax.__version__, "model": "tiny", "quick": True}
    path = tmp_path / "profile.json"
    save_profile(path, samples, meta)
    assert json.loads(path.read_text())["report_lags"][0] is None
    loaded, loaded_meta = load_profile(path)
    assert loaded_meta == meta
    for field in dataclasses.fields(StepSamples):
        np.testing.assert_array_equal(getattr(loaded, field.name), getattr(samples, field.name))
    assert fit(loaded, TINY_GEOMETRY) == fit(samples, TINY_GEOMETRY)


def test_bad_profiles_are_rejected_naming_the_file(tmp_path):
    save_profile(tmp_path / "good.json", synthetic(8, 6), {})
    good = json.loads((tmp_path / "good.json").read_text())
    bad = {
        "missing.json": None,
        "corrupt.json": '{"meta": {}, "seconds": [1',
        "keys.json": json.dumps({k: v for k, v in good.items() if k != "meta"}),
        "ragged.json": json.dumps({**good, "query_lens": [[1, 2], [1]]}),
        "shape.json": json.dumps({**good, "seconds": good["seconds"][:-1]}),
        "lags.json": json.dumps({**good, "report_lags": ["soon"] * len(good["seconds"])}),
    }
    for name, text in bad.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        with pytest.raises(ValueError, match=rf"profile '.*{name}'"):
            load_profile(path)
    with pytest.raises(ValueError, match="meta=.*expected a dict"):
        save_profile(tmp_path / "x.json", synthetic(8, 6), ["meta"])
    with pytest.raises(ValueError, match="meta is not JSON"):
        save_profile(tmp_path / "x.json", synthetic(8, 6), {"device": object()})
