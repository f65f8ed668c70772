"""Trace loaders with schema validation, and conversion to multi-turn workloads.

Each loader takes a path and returns a ``TraceRequests`` (``load_sharegpt``: a ``Workload``).
Malformed input raises ``TraceFormatError`` naming the file, the 1-based line and the field.
Shipped traces and their licences: ``experiments/data/`` (see its README).
"""

from symphony_jax.workloads.traces._format import TraceFormatError
from symphony_jax.workloads.traces.azure import load_azure
from symphony_jax.workloads.traces.burstgpt import load_burstgpt
from symphony_jax.workloads.traces.mooncake import load_mooncake, load_mooncake_sessions
from symphony_jax.workloads.traces.ragpulse import load_ragpulse
from symphony_jax.workloads.traces.sharegpt import load_sharegpt
from symphony_jax.workloads.traces.table import (TraceRequests, clamped_follow_ups,
                                                 inter_turn_gaps, to_workload, turns_per_session)

__all__ = [
    "TraceFormatError", "TraceRequests", "clamped_follow_ups", "inter_turn_gaps", "load_azure",
    "load_burstgpt", "load_mooncake", "load_mooncake_sessions", "load_ragpulse", "load_sharegpt",
    "to_workload", "turns_per_session",
]
