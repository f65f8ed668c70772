"""Links whose bandwidth concurrent flows share.

A flow moves ``nbytes`` over a path of links (a node's PCIe link one way, the source node's
network interface and the destination's), after a fixed ``latency`` during which it moves
nothing and takes no bandwidth (a copy's dispatch, an RPC, noticing its end). At any moment each
link splits its bandwidth evenly among the moving flows crossing it, and a flow runs at the
smallest share along its path; rates change only when a flow starts moving or ends, so between
those moments every flow progresses linearly and the next change is known exactly. A link of
infinite bandwidth moves bytes instantly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Sequence


@dataclasses.dataclass
class Flow:
    path: tuple[str, ...]  # names of the links it crosses
    nbytes: float
    on_done: Callable[[float], None]  # called with the completion time
    start_s: float
    moving_s: float = 0.0  # when its bytes start to move: start_s plus its latency
    left: float = 0.0  # bytes still to move
    rate: float = 0.0  # bytes per second now
    end_s: float = math.nan


class Network:
    def __init__(self, bandwidth: dict[str, float]):
        """``bandwidth``: bytes per second of each named link (``math.inf``: no limit)."""
        for name, value in bandwidth.items():
            if not value > 0:
                raise ValueError(f"Network: link {name!r} bandwidth={value!r}: expected > 0")
        self.bandwidth = dict(bandwidth)
        self.flows: list[Flow] = []
        self.now = 0.0
        self.moved: dict[str, float] = {name: 0.0 for name in bandwidth}  # bytes per link

    def start(self, path: Sequence[str], nbytes: float, now: float,
              on_done: Callable[[float], None], latency: float = 0.0) -> Flow:
        """Start a flow of ``nbytes`` over ``path`` at ``now`` (not before the last event),
        its bytes moving from ``now + latency`` on."""
        unknown = [name for name in path if name not in self.bandwidth]
        if unknown or not path:
            raise ValueError(f"Network.start: path={tuple(path)!r}: expected names of links "
                             f"among {sorted(self.bandwidth)}")
        if nbytes < 0:
            raise ValueError(f"Network.start: nbytes={nbytes!r}: expected >= 0")
        if not 0 <= latency < math.inf:
            raise ValueError(f"Network.start: latency={latency!r}: expected seconds >= 0")
        self.advance(now)
        flow = Flow(tuple(path), float(nbytes), on_done, now, now + latency, left=float(nbytes))
        self.flows.append(flow)
        self._rates()
        return flow

    def next_completion(self, links: Collection[str] | None = None) -> float:
        """When the next flow completes or starts moving at the current rates (``inf``: none
        in flight). With ``links``: the next such change that can change the flows crossing
        them (theirs, or that of a flow linked to them through shared links: it changes their
        rates)."""
        if not self.flows:
            return math.inf
        flows, reach = self.flows, set(links or ())
        while links is not None:  # widen to the links of the flows crossing them, until closed
            flows = [f for f in self.flows if not reach.isdisjoint(f.path)]
            wider = reach.union(*(f.path for f in flows))
            if wider == reach:
                break
            reach = wider
        return min((self._next_change(f) for f in flows), default=math.inf)

    def advance(self, now: float) -> list[Flow]:
        """Move time to ``now``, completing flows on the way (each at its exact time, rates
        updated after each); calls their ``on_done`` in completion order and returns them."""
        if now < self.now:
            raise ValueError(f"Network.advance({now}): time runs forward from {self.now}")
        done = []
        while self.flows:
            t = self.next_completion()
            if t > now:
                break
            finished = [f for f in self.flows
                        if self._moving(f) and self._next_change(f) <= t * (1 + 1e-12)]
            self._progress(t)
            self.flows = [f for f in self.flows if f not in finished]
            for f in finished:
                f.left, f.end_s = 0.0, t
            self._rates()
            done += finished
            for f in finished:
                f.on_done(t)
        self._progress(now)
        return done

    def _moving(self, flow: Flow) -> bool:
        return flow.moving_s <= self.now

    def _next_change(self, flow: Flow) -> float:
        """When ``flow`` starts moving, or else completes at its current rate."""
        return self.now + _duration(flow) if self._moving(flow) else flow.moving_s

    def _progress(self, t: float) -> None:
        dt = t - self.now
        for f in self.flows:
            moved = min(f.left, f.rate * dt) if math.isfinite(f.rate) else f.left
            f.left -= moved
            for name in f.path:
                self.moved[name] += moved
        self.now = t

    def _rates(self) -> None:
        moving = [f for f in self.flows if self._moving(f)]
        crossing = {name: 0 for name in self.bandwidth}
        for f in moving:
            for name in f.path:
                crossing[name] += 1
        for f in self.flows:
            f.rate = min(self.bandwidth[name] / crossing[name] for name in f.path) \
                if self._moving(f) else 0.0


def _duration(flow: Flow) -> float:
    if flow.left <= 0 or math.isinf(flow.rate):
        return 0.0
    return flow.left / flow.rate
