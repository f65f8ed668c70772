"""The serving systems compared, each a named composition of policies over the same machinery.

A ``System`` says how each node schedules and what it keeps after a turn (``Policy``), where a
request goes (``placement``), and what advisories do (``hints``). The six of SYMPHONY's
comparison (``SYSTEMS``):

- ``recompute`` (vLLM-like): nothing kept between turns, every request placed on the least
  loaded node; each turn recomputes the session's history.
- ``prefix_cache``: finished requests' full blocks stay cached by content on their node; a
  request goes back to the node holding its session's prefix unless that node is clearly
  busier (cache-aware routing).
- ``sticky_offload`` (InferCept / CachedAttention style): the session's K,V is written to the
  serving node's host tier (swap preemption too), and its next turn sticks to that node.
- ``ttl`` (Continuum style): the K,V stays pinned on the device for ``ttl_s`` after a turn, and
  the next turn sticks to that node while it is.
- ``symphony``: host retention with write-back (and swap preemption: a running sequence's full
  blocks are on the host already), every request placed on the least loaded node;
  an advisory picks that node ahead of the request and migrates the session's K,V there (host
  tier, then free device blocks, lower layers first), and the request keeps that pick unless
  the node has become clearly busier by its arrival; a request without one fetches what is
  elsewhere and loads it layer by layer. K,V its host tier evicts goes to the node's disk
  tier (where it has one; simulator only), and comes back when an advisory (or else the
  request) asks for it. Its K,V is managed in ``SYMPHONY_LAYER_GROUPS`` layer groups: room is
  made by taking the upper-most group of the least recently used idle session first, so
  sessions stay resident by a prefix of their layers.
- ``oracle``: ``symphony`` with pools ``memory_scale`` times larger and migrations that take no
  time (the cluster's clock stops while one runs): an upper bound.
"""

from __future__ import annotations

import dataclasses

from symphony_jax.cluster.placement import PLACEMENTS
from symphony_jax.config import EngineConfig
from symphony_jax.scheduler.policy import Policy

HINTS = ("ignore", "migrate")
TTL_S = 10.0  # Continuum-style pinning time of ``ttl``
SYMPHONY_LAYER_GROUPS = 4  # of ``symphony``: finer costs the scheduler more, coarser saves less


@dataclasses.dataclass(frozen=True)
class System:
    name: str
    policy: Policy  # each node's scheduling, preemption and retention
    placement: str  # a name of ``placement.PLACEMENTS``
    hints: str = "ignore"  # "migrate": an advisory moves the K,V to the node picked for it
    fetch_on_request: bool = False  # a request fetches its session's K,V from another node
    free_migration: bool = False  # migrations take no time (the clock stops)
    memory_scale: int = 1  # device and host pools times this
    layer_groups: int | None = None  # K,V managed in this many layer groups (None: the engine's)
    disk_tier: bool = False  # K,V the host tier evicts spills to the node's disk tier, if any

    def __post_init__(self):
        if not isinstance(self.policy, Policy):
            raise ValueError(f"System({self.name!r}).policy={self.policy!r}: expected a Policy")
        for field, allowed in (("placement", tuple(PLACEMENTS)), ("hints", HINTS)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"System({self.name!r}).{field}={getattr(self, field)!r}: "
                                 f"expected one of {', '.join(allowed)}")
        if (self.hints == "migrate" or self.fetch_on_request or self.disk_tier) and \
                not self.policy.uses_host:
            raise ValueError(f"System({self.name!r}): migrating K,V or a disk tier needs a "
                             "policy with a host tier (retention 'host' or preemption 'swap')")
        for field in ("memory_scale", "layer_groups"):
            value = getattr(self, field)
            if field == "layer_groups" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"System({self.name!r}).{field}={value!r}: expected an "
                                 "integer >= 1")

    @property
    def migrates(self) -> bool:
        return self.hints == "migrate" or self.fetch_on_request


SYSTEMS: dict[str, System] = {s.name: s for s in (
    System("recompute", Policy(), "least_loaded"),
    System("prefix_cache", Policy(prefix_caching=True), "cache_aware"),
    System("sticky_offload", Policy(retention="host", preemption="swap"), "sticky"),
    System("ttl", Policy(retention="ttl", ttl_s=TTL_S), "sticky"),
    System("symphony", Policy(retention="host", preemption="swap", layerwise_loading=True),
           "least_loaded", hints="migrate", fetch_on_request=True,
           layer_groups=SYMPHONY_LAYER_GROUPS, disk_tier=True),
    System("oracle", Policy(retention="host", preemption="swap"), "least_loaded",
           fetch_on_request=True, free_migration=True, memory_scale=16, disk_tier=True),
)}


def system(name: str | System) -> System:
    """The system registered as ``name`` (a ``System`` is returned as it is)."""
    if isinstance(name, System):
        return name
    try:
        return SYSTEMS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown system {name!r}: expected one of {', '.join(SYSTEMS)}") \
            from None


def node_engine(engine: EngineConfig, system: System) -> EngineConfig:
    """A node's engine config under ``system``: its layer groups (at most one per layer; the
    device pool keeps its bytes, in blocks of one group's layers), pools scaled by its
    ``memory_scale``, and a host tier where it needs one (as large as the device pool, if
    ``engine`` has none)."""
    cache = engine.cache
    token_blocks = (cache.num_device_blocks - 1) // cache.num_layer_groups  # of every layer
    host = cache.num_host_blocks or (token_blocks + 1 if system.policy.uses_host else 0)
    groups = min(system.layer_groups or cache.num_layer_groups, engine.model.num_layers)
    scale = system.memory_scale
    return dataclasses.replace(engine, cache=dataclasses.replace(
        cache, num_device_blocks=token_blocks * groups * scale + 1, num_host_blocks=host * scale,
        num_layer_groups=groups))
