"""A synthetic ShareGPT-like multi-turn chat workload, calibrated to published statistics.

ShareGPT (conversations users shared from ChatGPT, 2023) is the workload SYMPHONY and most
multi-turn serving papers evaluate on, but it cannot be shipped here. This generator matches
its published shape:

- **Turns per conversation**: mean 3.51 (ShareGPT: 94,145 conversations, 330,239 turns; LMSYS-
  Chat-1M, arXiv 2309.11998, Table 1, reproduced in ShareChat, arXiv 2512.17843) and 73% of
  conversations multi-turn (CachedAttention, arXiv 2403.19708). Both are *calibrated
  targets*. Model: a conversation is single-turn with probability 0.27; otherwise it has
  ``2 + G`` turns with ``G`` geometric on {0, 1, ...}, whose mean 2.44 makes the overall mean
  3.51. The tail is then about 3% of conversations above 10 turns (WildChat-1M reports 3.7%,
  arXiv 2405.01470).
- **Tokens per turn**: log-normal, with means 94.46 new input tokens per user turn and 348.45
  output tokens per answer (ShareGPT row of LMSYS-Chat-1M Table 1; *calibrated targets*). The
  spreads are this module's choice: sigma 1.4 for prompts (median 35 tokens: most follow-ups
  are short, a few paste documents; Mooncake's real follow-ups have a median of 30 new tokens)
  and sigma 0.7 for answers (coefficient of variation 0.8). Counts are rounded, at least 1.
- Optional ``mean_first_input_tokens`` and ``first_input_sigma`` give the opening prompt its
  own log-normal: a conversation about a document or a code base pastes it first and asks
  short follow-ups. ``LONG_CHAT`` opens like the Mooncake conversation trace (Kimi, FAST'25)
  shipped in ``experiments/data``: its sessions' first prompts have a mean of 11,271 tokens, a
  median of 5,963 and a log-space sigma of 1.26 (8,340 sessions, measured here); its follow-ups
  (median 28 new tokens) and answers (mean 343 tokens) are close to ShareGPT's, so those keep
  ShareGPT's shape.
- Optional ``max_context_tokens`` truncates a conversation before the first turn whose prompt
  plus answer would not fit a model's context window (later turns depend on it, so they go too).

Every draw is keyed by (seed, session, turn), so ``sharegpt_like(n)`` is a prefix of
``sharegpt_like(m)`` for ``n < m``, and generating 100k sessions takes well under a second.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from symphony_jax.workloads import _random
from symphony_jax.workloads._checks import (check_number, cumsum_in_groups, fail,
                                            positions_in_groups)
from symphony_jax.workloads.session import Workload

_TURNS, _INPUT, _OUTPUT = 21, 22, 23  # streams of keyed draws


@dataclasses.dataclass(frozen=True)
class ShareGPTLike:
    """Shape of the synthetic workload (defaults: ShareGPT, see the module docstring)."""

    mean_turns: float = 3.51
    multi_turn_fraction: float = 0.73
    mean_input_tokens: float = 94.46
    input_sigma: float = 1.4
    mean_output_tokens: float = 348.45
    output_sigma: float = 0.7
    mean_first_input_tokens: float | None = None  # None: the opening prompt is like the others
    first_input_sigma: float | None = None  # None: input_sigma
    max_context_tokens: int | None = None

    def __post_init__(self):
        owner = "ShareGPTLike"
        check_number(owner, "multi_turn_fraction", self.multi_turn_fraction, 0.0, 1.0)
        # at least 1 turn, and at least 2 for the multi-turn share
        check_number(owner, "mean_turns", self.mean_turns, 1.0 + self.multi_turn_fraction)
        if self.multi_turn_fraction == 0 and self.mean_turns != 1:
            fail(owner, "mean_turns", self.mean_turns, "1 when multi_turn_fraction is 0")
        for field in ("mean_input_tokens", "mean_output_tokens"):
            check_number(owner, field, getattr(self, field), 1.0)
        for field in ("input_sigma", "output_sigma"):
            check_number(owner, field, getattr(self, field), 0.0, 4.0)
        if self.mean_first_input_tokens is not None:
            check_number(owner, "mean_first_input_tokens", self.mean_first_input_tokens, 1.0)
        if self.first_input_sigma is not None:
            check_number(owner, "first_input_sigma", self.first_input_sigma, 0.0, 4.0)
        if self.max_context_tokens is not None:
            check_number(owner, "max_context_tokens", self.max_context_tokens, 2)

    @property
    def geometric_p(self) -> float:
        """Success probability of the geometric extra-turn count of multi-turn conversations."""
        m = self.multi_turn_fraction
        extra_mean = (self.mean_turns - (1.0 - m)) / m - 2.0 if m else 0.0
        return 1.0 / (1.0 + extra_mean)

    @property
    def opening(self) -> tuple[float, float]:
        """Mean and sigma of the opening prompt's log-normal."""
        mean, sigma = self.mean_first_input_tokens, self.first_input_sigma
        return (self.mean_input_tokens if mean is None else mean,
                self.input_sigma if sigma is None else sigma)


# Conversations that open with a long document (Mooncake's first prompts; module docstring).
LONG_CHAT = ShareGPTLike(mean_first_input_tokens=11271.0, first_input_sigma=1.26)


def sharegpt_like(num_sessions: int, config: ShareGPTLike = ShareGPTLike(),
                  seed: int = 0) -> Workload:
    """``num_sessions`` conversations with ids 0..num_sessions-1 (fewer turns if truncated)."""
    if isinstance(num_sessions, bool) or not isinstance(num_sessions, (int, np.integer)) or \
            num_sessions < 0:
        fail("sharegpt_like", "num_sessions", num_sessions, "an integer >= 0")
    sessions = np.arange(num_sessions, dtype=np.int64)
    u = _random.uniform(seed, _TURNS, sessions, 0)
    multi = _random.uniform(seed, _TURNS, sessions, 1) < config.multi_turn_fraction
    p = config.geometric_p
    extra = np.floor(np.log(u) / np.log1p(-p)).astype(np.int64) if p < 1 else 0
    turns = np.where(multi, 2 + extra, 1)
    session_id = np.repeat(sessions, turns)
    turn = positions_in_groups(turns)
    (opening_mean, opening_sigma), first = config.opening, turn == 0
    mean = np.where(first, opening_mean, config.mean_input_tokens)
    sigma = np.where(first, opening_sigma, config.input_sigma)
    inputs = _random.lognormal_tokens(mean, sigma, seed, _INPUT, session_id, turn)
    outputs = _random.lognormal_tokens(config.mean_output_tokens, config.output_sigma, seed,
                                       _OUTPUT, session_id, turn)
    workload = Workload(session_id, inputs, outputs)
    if config.max_context_tokens is None:
        return workload
    return truncate_to_context(workload, config.max_context_tokens)


def truncate_to_context(workload: Workload, max_context_tokens: int) -> Workload:
    """Each session up to (excluding) its first turn whose prompt plus answer exceeds the limit.

    Sessions whose first turn does not fit disappear.
    """
    w = workload
    too_long = w.prompt_tokens + w.output_tokens > max_context_tokens
    # once a turn is too long, it and the rest of its session go
    return w.select_rows(cumsum_in_groups(too_long, w.turns_per_session) == 0)

