"""The global scheduler: where each session's K,V is, how loaded each node is, where requests go.

It keeps a table session -> ``KVLocation`` (the node holding the K,V and for how long it is
kept there) and each node's queued work (``placement.NodeLoads``), and applies the system's
placement policy. With ``hints="migrate"`` an advisory picks the node for the session's next
request ahead of it (by the placement policy at that moment, wherever the K,V is: it is about
to move). Until the request comes it counts in that node's load as a request generating (for
``ADVISED_FOR_S`` at most: a false advisory's request never comes; the advisory itself is
forgotten after ``ADVICE_KEPT_S``), so that advisories arriving together do not all pick the
node that was least loaded before them. The request goes to the
advised node unless, by the time it arrives, that node has ``CACHE_SLACK`` steps' worth more work
queued than the least loaded one; then the placement policy picks again and the K,V follows on
request. A pick is a forecast: work queued when the advisory came (a long prompt being
prefilled, say) may be gone when the request arrives, and new work may be there instead. A
request whose K,V is still on its way to the advised node goes there all the same (elsewhere it
would recompute its history).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from symphony_jax.cluster.placement import CACHE_SLACK, PLACEMENTS, NodeLoads
from symphony_jax.cluster.systems import System

ADVISED_FOR_S = 60.0  # an advised request counts in its node's load this long at most
ADVICE_KEPT_S = 600.0  # an advisory whose request has not come is forgotten after this long

@dataclasses.dataclass
class KVLocation:
    node: int
    tokens: int  # of the session's tokens, those whose K,V is there
    until_s: float = math.inf  # kept there until then (retention ``ttl``)


class GlobalScheduler:
    def __init__(self, system: System, num_nodes: int, *, step_tokens: int, step_seqs: int):
        self.system, self.place_fn = system, PLACEMENTS[system.placement]
        self.step_tokens, self.step_seqs = step_tokens, step_seqs
        self.where: dict[int, KVLocation] = {}
        # Advisories kept (``ADVICE_KEPT_S``), oldest first: session -> (node picked, when)
        # (``hints`` "migrate"), and session -> when first advised since its last request (any
        # system); of the picks, those counted in their node's load (``ADVISED_FOR_S``), and
        # their count per node.
        self.advised: dict[int, tuple[int, float]] = {}
        self.advised_at: dict[int, float] = {}
        self.counted: dict[int, int] = {}
        self.expected = np.zeros(num_nodes, np.int64)
        self.prefill = np.zeros(num_nodes, np.int64)
        self.decoding = np.zeros(num_nodes, np.int64)
        self.alive = np.ones(num_nodes, bool)
        self.placed = 0

    def loads(self, now: float) -> NodeLoads:
        """Each node's queued prompt tokens and requests generating, advised ones included."""
        self._expire(now)
        return NodeLoads(self.prefill.copy(), self.decoding + self.expected, self.alive.copy(),
                         self.step_tokens, self.step_seqs)

    def kv_node(self, session_id: int, now: float) -> int:
        """The live node holding ``session_id``'s K,V (-1: none)."""
        loc = self.where.get(session_id)
        if loc is None or loc.until_s <= now or not self.alive[loc.node]:
            return -1
        return loc.node

    def kept_tokens(self, session_id: int, node: int, now: float) -> int:
        """Tokens of ``session_id`` whose K,V ``node`` holds (0 if another node or none)."""
        return self.where[session_id].tokens if self.kv_node(session_id, now) == node else 0

    def place(self, session_id: int, now: float, moving: bool = False) -> int:
        """The node for ``session_id``'s request arriving now (``moving``: its K,V is on its way
        to the node its advisory picked)."""
        self._expire(now)
        node = self._unadvise(session_id)
        loads = self.loads(now)
        if node < 0 or not self.alive[node] or \
                (not moving and loads.score[node] > loads.score.min() + CACHE_SLACK):
            node = self.place_fn(loads, self.kv_node(session_id, now), self.placed)
        self.placed += 1
        return node

    def advise(self, session_id: int, now: float) -> int:
        """Pick the node for ``session_id``'s next request now (a repeated advisory keeps the
        first pick while its node lives)."""
        self._expire(now)
        node, _ = self.advised.get(session_id, (-1, now))
        if node < 0 or not self.alive[node]:
            self._unadvise(session_id)
            node = self.place_fn(self.loads(now), -1, self.placed)
            self.advised[session_id] = (node, now)
            self.counted[session_id] = node
            self.expected[node] += 1
        return node

    # ------------------------------------------------------------ advisories

    def note_advisory(self, session_id: int, now: float) -> None:
        """An advisory of ``session_id`` came now (whatever the system does with it)."""
        self._expire(now)
        self.advised_at.setdefault(session_id, now)

    def advisory_time(self, session_id: int, now: float) -> float:
        """When ``session_id``'s request arriving now was first advised (nan: it was not, or
        longer than ``ADVICE_KEPT_S`` ago)."""
        self._expire(now)
        return self.advised_at.pop(session_id, math.nan)

    def _unadvise(self, session_id: int) -> int:
        """Forget ``session_id``'s pick; returns its node (-1: none)."""
        node, _ = self.advised.pop(session_id, (-1, 0.0))
        self._uncount(session_id)
        return node

    def _uncount(self, session_id: int) -> None:
        node = self.counted.pop(session_id, -1)
        if node >= 0:
            self.expected[node] -= 1

    def _expire(self, now: float) -> None:
        """Stop counting picks older than ``ADVISED_FOR_S`` and forget advisories older than
        ``ADVICE_KEPT_S`` (their requests did not come). The tables are in time order, so
        this costs what it drops."""
        while self.counted:
            session = next(iter(self.counted))
            if now - self.advised[session][1] < ADVISED_FOR_S:
                break
            self._uncount(session)
        for table, when in ((self.advised, lambda v: v[1]), (self.advised_at, lambda v: v)):
            while table:
                session, value = next(iter(table.items()))
                if now - when(value) < ADVICE_KEPT_S:
                    break
                del table[session]

    # ------------------------------------------------------------ accounting

    def started(self, node: int, prefill_tokens: int) -> None:
        self.prefill[node] += prefill_tokens

    def first_token(self, node: int, prefill_tokens: int) -> None:
        self.prefill[node] -= prefill_tokens
        self.decoding[node] += 1

    def ended(self, node: int, prefill_tokens: int, decoding: bool) -> None:
        """A request left ``node`` (finished, rejected, or moved away)."""
        self.prefill[node] -= 0 if decoding else prefill_tokens
        self.decoding[node] -= int(decoding)

    def kept(self, session_id: int, node: int, tokens: int, now: float) -> None:
        """A turn of ``session_id`` ended on ``node``; its K,V stays as the policy says."""
        policy = self.system.policy
        if policy.retention == "drop" and not policy.prefix_caching:
            self.where.pop(session_id, None)
        else:
            self.where[session_id] = KVLocation(node, tokens, now + policy.retention_s
                                                if policy.retention != "drop" else math.inf)

    def node_index(self, node, where: str) -> int:
        """``node`` as the index of one of the nodes, or a ``ValueError`` naming it."""
        if isinstance(node, bool) or not isinstance(node, (int, np.integer)) or \
                not 0 <= node < len(self.alive):
            raise ValueError(f"{where}({node!r}): expected a node index in [0, {len(self.alive)})")
        return int(node)

    def remove(self, node: int) -> list[int]:
        """``node`` is gone; returns the sessions whose K,V was there (now lost)."""
        node = self.node_index(node, "remove")
        self.alive[node] = False
        lost = [s for s, loc in self.where.items() if loc.node == node]
        for s in lost:
            del self.where[s]
        self.advised = {s: pick for s, pick in self.advised.items() if pick[0] != node}
        self.counted = {s: n for s, n in self.counted.items() if n != node}
        self.expected[node] = 0
        return lost
