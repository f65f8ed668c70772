"""Several serving nodes, the global scheduler, SYMPHONY's node manager and advisory API, and
the systems SYMPHONY is compared with (``systems.SYSTEMS``).

Placement and systems are plain policies (no model): the simulator uses them too. The real
cluster (``Cluster``, ``run``), which runs engines, is imported on first use.
"""

from symphony_jax.cluster.records import ClusterRecords
from symphony_jax.cluster.systems import SYSTEMS, System, system

_REAL = {"Cluster": "cluster", "ClusterConfig": "cluster", "run": "replay"}


def __getattr__(name: str):
    if name in _REAL:
        import importlib

        return getattr(importlib.import_module(f"symphony_jax.cluster.{_REAL[name]}"), name)
    raise AttributeError(f"module 'symphony_jax.cluster' has no attribute {name!r}")


__all__ = ["Cluster", "ClusterConfig", "ClusterRecords", "SYSTEMS", "System", "run", "system"]
