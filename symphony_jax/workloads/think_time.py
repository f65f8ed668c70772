"""Think time between turns: reading the answer, an optional idle gap, typing the next prompt.

After a response finishes, a chat user

1. reads it: ``output_tokens / tokens_per_word`` words at ``reading_wpm``;
2. may stay idle for an extra gap drawn from ``extra`` (none, exponential, or resampled from
   a trace);
3. types the next prompt: ``input_tokens / tokens_per_word`` words at ``typing_wpm``, for at
   most ``max_typing_s`` (a longer prompt is pasted: trace prompts that carry documents or
   retrieved context would otherwise take minutes to "type").

The client sends the advisory for the next turn when typing starts (SYMPHONY, NSDI'26 §3.1), so
an advisory's lead time is the typing time.

Defaults and where they come from:

- ``reading_wpm = 238``: silent reading of English non-fiction (Brysbaert, "How many words do
  we read per minute? A review and meta-analysis of reading rate", J. Memory and Language,
  2019).
- ``tokens_per_word = 4/3``: BPE tokenizers on English text give about 0.75 words per token.
- ``typing_wpm = 376`` is *calibrated*, not a human typing speed: with it, the mean typing time
  of ShareGPT-like prompts (94.46 new tokens per turn on average, see ``sharegpt_synth``) is
  94.46 / (4/3) / 376 * 60 = 11.3 s, the mean chat advisory lead reported for SYMPHONY
  (arXiv 2412.16434, NSDI'26 Fig. 10). Touch typists reach about 52 wpm (Dhakal et al.,
  "Observations on typing from 136 million keystrokes", CHI 2018), which would give leads of
  about 80 s; long ShareGPT prompts are pasted rather than typed. Pass ``typing_wpm=52`` for a
  pure typing model.

With these defaults a ShareGPT-like answer (348 tokens) takes about 66 s to read, so the mean
think time is about 77 s, close to the arrival-to-arrival gaps measured in real chat traces
(BurstGPT conversations p50 77 s, RAGPulse p50 40 s, Mooncake p50 129 s; see
``experiments/data/README.md``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from symphony_jax.workloads import _random
from symphony_jax.workloads._checks import check_number, column, fail

READING_WPM = 238.0
TYPING_WPM = 376.0
TOKENS_PER_WORD = 4.0 / 3.0


@dataclasses.dataclass(frozen=True)
class NoGap:
    """No extra idle time."""

    def sample(self, seed: int, stream: int, *keys: np.ndarray) -> np.ndarray:
        return np.zeros(np.broadcast_shapes(*(np.shape(k) for k in keys)), np.float64)


@dataclasses.dataclass(frozen=True)
class ExponentialGap:
    """Exponential idle time, as in Pensieve's and Learned Prefix Caching's think-time models."""

    mean_s: float

    def __post_init__(self):
        check_number("ExponentialGap", "mean_s", self.mean_s, 0.0, low_open=True)

    def sample(self, seed: int, stream: int, *keys: np.ndarray) -> np.ndarray:
        return _random.exponential(self.mean_s, seed, stream, *keys)


@dataclasses.dataclass(frozen=True, eq=False)
class EmpiricalGap:
    """Idle time resampled (uniformly, with replacement) from observed gaps, e.g. a trace's."""

    samples_s: np.ndarray  # f64[N] observed gaps (s), finite, >= 0, N >= 1

    def __post_init__(self):
        samples = column("EmpiricalGap", "samples_s", self.samples_s, np.float64, minimum=0.0)
        if not len(samples) or not np.all(np.isfinite(samples)):
            fail("EmpiricalGap", "samples_s", f"<{len(samples)} samples>",
                 "at least one finite gap")
        object.__setattr__(self, "samples_s", samples)

    def sample(self, seed: int, stream: int, *keys: np.ndarray) -> np.ndarray:
        u = _random.uniform(seed, stream, *keys)
        return self.samples_s[np.minimum((u * len(self.samples_s)).astype(np.int64),
                                         len(self.samples_s) - 1)]


Gap = NoGap | ExponentialGap | EmpiricalGap


@dataclasses.dataclass(frozen=True)
class ThinkTime:
    """A chat user's reading and typing speeds, and the extra idle gap between turns."""

    reading_wpm: float = READING_WPM
    typing_wpm: float = TYPING_WPM
    tokens_per_word: float = TOKENS_PER_WORD
    extra: Gap = NoGap()
    max_typing_s: float = np.inf

    def __post_init__(self):
        for field in ("reading_wpm", "typing_wpm", "tokens_per_word", "max_typing_s"):
            check_number("ThinkTime", field, getattr(self, field), 0.0, low_open=True)
        if not isinstance(self.extra, (NoGap, ExponentialGap, EmpiricalGap)):
            fail("ThinkTime", "extra", self.extra, "a NoGap, ExponentialGap or EmpiricalGap")

    def reading_s(self, output_tokens: np.ndarray) -> np.ndarray:
        """f64: seconds to read answers of ``output_tokens`` tokens."""
        return np.asarray(output_tokens, np.float64) * (60.0 / self.tokens_per_word /
                                                        self.reading_wpm)

    def typing_s(self, input_tokens: np.ndarray) -> np.ndarray:
        """f64: seconds to type prompts of ``input_tokens`` tokens (the advisory lead)."""
        seconds = np.asarray(input_tokens, np.float64) * (60.0 / self.tokens_per_word /
                                                          self.typing_wpm)
        return np.minimum(seconds, self.max_typing_s)
