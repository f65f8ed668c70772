"""Logits of the paged and dense forwards equal Hugging Face transformers on the same weights."""

import numpy as np
import pytest

from hf_models import HF_MODELS, save_hf_model
from paged_runs import PagedRun
from symphony_jax.model import dense
from symphony_jax.model.hf_weights import load_hf
from symphony_jax.model.tokenizer import Tokenizer


@pytest.fixture(scope="module", params=list(HF_MODELS))
def reference(request, tmp_path_factory):
    """A random transformers Llama in float32, and the same weights loaded by us."""
    directory = tmp_path_factory.mktemp(request.param)
    model = save_hf_model(HF_MODELS[request.param], directory, dtype="float32")
    return model, *load_hf(directory)


def transformers_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.double().numpy()


def assert_logits_close(actual, expected):
    # float32 throughout; logits here reach tens, so compare relative to their scale
    scale = np.abs(expected).max()
    np.testing.assert_allclose(actual, expected, atol=1e-4 * scale, rtol=1e-4)


def test_dense_forward_equals_transformers(reference):
    model, config, params = reference
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 40)).astype(np.int32)
    out, _ = dense.forward(params, dense.init_cache(config, 2, 40), tokens, config=config)
    assert_logits_close(np.asarray(out, np.float64), transformers_logits(model, tokens))


def test_paged_forward_equals_transformers(reference):
    """Two sequences in one mixed step (chunks of different lengths), then decode steps."""
    model, config, params = reference
    rng = np.random.default_rng(1)
    sequences = [rng.integers(0, config.vocab_size, n).astype(np.int32) for n in (30, 21)]
    expected = [transformers_logits(model, s[None])[0] for s in sequences]
    run = PagedRun(params, config)
    first = run.step([(0, sequences[0][:27]), (1, sequences[1][:18])], all_logits=True)
    assert_logits_close(first, np.concatenate([expected[0][:27], expected[1][:18]]))
    for position in range(3):
        out = run.step([(0, sequences[0][27 + position:28 + position]),
                        (1, sequences[1][18 + position:19 + position])], decode=True)
        assert_logits_close(out, np.stack([expected[0][27 + position],
                                           expected[1][18 + position]]))


@pytest.mark.slow
def test_smollm2_continues_the_capital_of_france_with_paris(smollm2, smollm2_transformers):
    path, config, params = smollm2
    tokenizer = Tokenizer.from_gguf(path)
    prompt = np.asarray(tokenizer.encode("The capital of France is"), np.int32)
    run = PagedRun(params, config, slots=1, blocks=8, block_size=16, width=4, tokens=32)
    tokens, logits = run.greedy(0, prompt, steps=6)
    assert "Paris" in tokenizer.decode(tokens)
    # The first steps' logits match transformers' forward of the same file.
    expected = transformers_logits(smollm2_transformers, np.concatenate([prompt, tokens])[None])
    steps = len(prompt) - 1 + np.arange(3)
    assert_logits_close(np.stack(logits[:3]), expected[0, steps])
