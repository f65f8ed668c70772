"""Scheduling policies: configuration, not code forks.

A ``Policy`` is static (hashable): the jitted transitions specialise on it. Limits (sequences
and tokens per step, model length) come from ``SchedulerConfig``.
"""

from __future__ import annotations

import dataclasses
import math

ORDERS = ("fcfs", "priority")
PREFILLS = ("decode_first", "prefill_first")
PREEMPTIONS = ("recompute", "swap")
RETENTIONS = ("drop", "keep", "ttl", "host")


def _choice(owner, field: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{owner}.{field}={value!r}: expected one of {', '.join(allowed)}")


@dataclasses.dataclass(frozen=True)
class Policy:
    """How one node orders, batches, preempts and retains.

    - ``order``: ``fcfs`` (arrival, then request id) or ``priority`` (lower first, then fcfs).
    - ``prefill``: ``decode_first`` — running sequences' decode tokens take the budget first,
      prompts share what is left (Sarathi / vLLM with chunked prefill); ``prefill_first`` —
      waiting prompts first, decodes with what is left.
    - ``chunked_prefill``: a prompt may run in chunks; without it a prompt runs whole or waits.
    - ``preemption``: when running sequences need blocks that are not there, the last in order
      loses its K,V: ``recompute`` drops it (recomputed when it runs again); ``swap`` copies it
      to the host tier and restores it when it runs again (needs a host tier).
    - ``retention``: what a finished request leaves behind for its session's next turn:
      ``drop`` frees its K,V (the next turn recomputes the history), ``keep`` keeps it on the
      device until memory is needed (least recently used idle sessions go first), ``ttl`` keeps
      it for ``ttl_s`` seconds (Continuum style) or until memory is needed, ``host`` keeps it on
      the device as ``keep`` does and also on the host tier, written back as tokens are
      generated, so that dropping the device copy costs nothing and the next turn restores it
      instead of recomputing (needs a host tier).
    - ``layerwise_loading``: a restored request computes in the step that restores it, each
      layer's K,V copied to the device inside the layer loop; without it the copy completes
      first (``LOADING``) and the request runs in a later step.
    - ``prefix_caching``: full blocks of finished requests stay cached by content
      (``prefix_cache``); a new request starts from the longest cached prefix of its prompt,
      across sessions. Cached blocks nobody uses are the first to go when memory is needed.
    """

    order: str = "fcfs"
    prefill: str = "decode_first"
    chunked_prefill: bool = True
    preemption: str = "recompute"
    retention: str = "drop"
    ttl_s: float = math.inf
    prefix_caching: bool = False
    layerwise_loading: bool = False

    def __post_init__(self):
        for field, allowed in (("order", ORDERS), ("prefill", PREFILLS),
                               ("preemption", PREEMPTIONS), ("retention", RETENTIONS)):
            _choice("Policy", field, getattr(self, field), allowed)
        for field in ("chunked_prefill", "prefix_caching", "layerwise_loading"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"Policy.{field}={getattr(self, field)!r}: expected a bool")
        if isinstance(self.ttl_s, bool) or not isinstance(self.ttl_s, (int, float)) or \
                not self.ttl_s > 0:
            raise ValueError(f"Policy.ttl_s={self.ttl_s!r}: expected a number > 0")

    @property
    def uses_host(self) -> bool:
        """Whether K,V moves to and from a host tier under this policy."""
        return self.preemption == "swap" or self.retention == "host"

    @property
    def retention_s(self) -> float:
        """How long a finished session's K,V is kept (0: dropped at once)."""
        return {"drop": 0.0, "keep": math.inf, "ttl": float(self.ttl_s),
                "host": math.inf}[self.retention]
