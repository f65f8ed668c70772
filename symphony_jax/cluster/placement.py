"""Where a request goes: placement policies, pure functions of the nodes' load.

A node's load is the work it has queued, in steps' worth of its capacity: the prompt tokens its
requests have still to compute over ``max_num_batched_tokens``, plus its requests generating
over ``max_num_seqs`` (each takes one of a step's sequences until it finishes). Every policy is
``place(loads, kv_node, seq) -> node``: ``kv_node`` is the node holding the session's K,V (-1:
none known), ``seq`` counts the placements made so far (round robin, and rotating ties so that
equal nodes share the work).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class NodeLoads:
    """What each of N nodes has queued."""

    prefill_tokens: np.ndarray  # i64[N]  prompt tokens its requests have still to compute
    decoding: np.ndarray  # i64[N]  its requests generating
    alive: np.ndarray  # bool[N]
    step_tokens: int  # max_num_batched_tokens of a node
    step_seqs: int  # max_num_seqs of a node

    @property
    def score(self) -> np.ndarray:
        """f64[N]: steps' worth of queued work; inf for nodes that are gone."""
        work = self.prefill_tokens / self.step_tokens + self.decoding / self.step_seqs
        return np.where(self.alive, work, np.inf)


def least_loaded(loads: NodeLoads, kv_node: int, seq: int) -> int:
    """The node with the least queued work (ties rotate with ``seq``)."""
    n = len(loads.alive)
    return int((np.argmin(np.roll(loads.score, -seq)) + seq) % n)


def round_robin(loads: NodeLoads, kv_node: int, seq: int) -> int:
    """Live nodes in turn."""
    alive = np.flatnonzero(loads.alive)
    return int(alive[seq % len(alive)])


def sticky(loads: NodeLoads, kv_node: int, seq: int) -> int:
    """The node holding the session's K,V, else the least loaded."""
    if 0 <= kv_node < len(loads.alive) and loads.alive[kv_node]:
        return kv_node
    return least_loaded(loads, kv_node, seq)


CACHE_SLACK = 1.0  # steps' worth of extra queued work a cache hit is worth


def cache_aware(loads: NodeLoads, kv_node: int, seq: int) -> int:
    """The node holding the session's K,V unless it has ``CACHE_SLACK`` steps' worth more work
    queued than the least loaded node (then that one)."""
    best = least_loaded(loads, kv_node, seq)
    if 0 <= kv_node < len(loads.alive) and loads.alive[kv_node] and \
            loads.score[kv_node] <= loads.score[best] + CACHE_SLACK:
        return kv_node
    return best


Placement = Callable[[NodeLoads, int, int], int]
PLACEMENTS: dict[str, Placement] = {"least_loaded": least_loaded, "round_robin": round_robin,
                                    "sticky": sticky, "cache_aware": cache_aware}
