"""Text to token ids and back, from a Hugging Face ``tokenizer.json`` or a GGUF vocabulary.

Both build a ``tokenizers.Tokenizer``. A GGUF file of tokenizer model ``gpt2`` (byte-level BPE,
the Llama 3 and SmolLM2 kind) is rebuilt from its tokens, merges and token types, with the
pre-tokenizer its ``tokenizer.ggml.pre`` names. Chat templates are not applied here.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Iterable

import gguf
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from symphony_jax.model.gguf_weights import metadata, open_gguf
from symphony_jax.model.hf_weights import read_json
from symphony_jax.model.weights import WeightsError

# Llama 3's split of text into words before BPE (contractions, letters, up to three digits,
# punctuation runs, newlines, other spaces), as llama.cpp's "llama-bpe" pre-tokenizer.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _gpt2_words() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2_words() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    _gpt2_words()])


def _llama3_words() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


# tokenizer.ggml.pre -> how text is split into words before the merges apply.
GGUF_PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "gpt-2": _gpt2_words,
    "smollm": _digits_then_gpt2_words,
    "llama-bpe": _llama3_words,
}


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """A tokenizer and the special token ids generation needs.

    ``encode`` adds what the tokenizer's post-processor adds (for example Llama 3's BOS) and
    matches special tokens written in the text (``<|im_start|>``) whole.
    """

    backend: tokenizers.Tokenizer
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @property
    def vocab_size(self) -> int:
        """The number of token ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @classmethod
    def from_hf(cls, directory: str | pathlib.Path) -> Tokenizer:
        """From ``tokenizer.json`` in a Hugging Face model directory.

        BOS and EOS come from ``tokenizer_config.json``; EOS ids listed in
        ``generation_config.json`` (Llama 3 lists several) are added to the EOS one.
        """
        directory = pathlib.Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise WeightsError(f"{path}: missing")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception on a malformed file
            raise WeightsError(f"{path}: not a readable tokenizer: {error}") from None
        special = _json_or_empty(directory / "tokenizer_config.json")
        generation = _json_or_empty(directory / "generation_config.json")

        def token_id(key: str) -> int | None:
            token = special.get(key)
            token = token.get("content") if isinstance(token, dict) else token
            return None if token is None else backend.token_to_id(token)

        eos = [token_id("eos_token")]
        listed = generation.get("eos_token_id")
        eos += listed if isinstance(listed, list) else [listed]
        return cls(backend, token_id("bos_token"),
                   tuple(dict.fromkeys(i for i in eos if i is not None)))

    @classmethod
    def from_gguf(cls, path: str | pathlib.Path) -> Tokenizer:
        """From the vocabulary in a GGUF file (tokenizer model ``gpt2``: byte-level BPE)."""
        path = pathlib.Path(path)
        reader = open_gguf(path)

        def field(key: str, kind: type, *default):
            return metadata(reader, path, f"tokenizer.ggml.{key}", kind, *default)

        model = field("model", str)
        if model != "gpt2":
            raise WeightsError(f"{path}: tokenizer.ggml.model={model!r}: expected 'gpt2' "
                               "(byte-level BPE)")
        pre = field("pre", str, "gpt-2")
        if pre not in GGUF_PRE_TOKENIZERS:
            raise WeightsError(f"{path}: tokenizer.ggml.pre={pre!r}: expected one of "
                               f"{', '.join(GGUF_PRE_TOKENIZERS)}")
        tokens = field("tokens", list)
        merges = [tuple(merge.split(" ")) for merge in field("merges", list, [])]
        if any(len(pair) != 2 for pair in merges):
            raise WeightsError(f"{path}: tokenizer.ggml.merges: expected entries 'left right'")
        backend = tokenizers.Tokenizer(models.BPE(
            vocab={token: index for index, token in enumerate(tokens)}, merges=merges))
        backend.pre_tokenizer = GGUF_PRE_TOKENIZERS[pre]()
        backend.decoder = decoders.ByteLevel()
        types = field("token_type", list, [])
        backend.add_special_tokens(_added(tokens, types, gguf.TokenType.CONTROL, special=True))
        backend.add_tokens(_added(tokens, types, gguf.TokenType.USER_DEFINED, special=False))

        bos, eos = field("bos_token_id", int, None), field("eos_token_id", int, None)
        prefix = _template_tokens(tokens, bos, field("add_bos_token", bool, False))
        suffix = _template_tokens(tokens, eos, field("add_eos_token", bool, False))
        if prefix or suffix:
            backend.post_processor = processors.TemplateProcessing(
                single=[token for token, _ in prefix] + ["$A"] + [token for token, _ in suffix],
                special_tokens=prefix + suffix)
        return cls(backend, bos, () if eos is None else (eos,))


def _added(tokens: list[str], types: list[int], kind: gguf.TokenType, special: bool
           ) -> list[AddedToken]:
    """The tokens of ``kind``, matched whole in the text instead of split by the merges."""
    return [AddedToken(token, special=special, normalized=False)
            for token, token_type in zip(tokens, types) if token_type == kind]


def _json_or_empty(path: pathlib.Path) -> dict:
    return read_json(path) if path.is_file() else {}


def _template_tokens(tokens: list[str], index: int | None, add: bool) -> list[tuple[str, int]]:
    return [(tokens[index], index)] if add and index is not None else []

