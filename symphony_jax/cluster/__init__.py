"""Several serving nodes, the global scheduler, SYMPHONY's node manager and advisory API, and
the systems SYMPHONY is compared with (``systems.SYSTEMS``)."""

from symphony_jax.cluster.cluster import Cluster, ClusterConfig, ClusterRecords
from symphony_jax.cluster.run import run
from symphony_jax.cluster.systems import SYSTEMS, System, system

__all__ = ["Cluster", "ClusterConfig", "ClusterRecords", "SYSTEMS", "System", "run", "system"]
