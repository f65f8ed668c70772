"""Workloads: multi-turn sessions, think times, advisory requests, agents and real traces.

numpy only (no JAX): the real cluster and the simulator consume the same objects.

- ``session``: ``Turn``, ``Session`` and the columnar ``Workload`` (the contract).
- ``think_time``: reading + idle + typing time between turns (``ThinkTime``).
- ``advisory``: advisory tables and the knobs that drop, delay and fake them.
- ``schedule``: ``Schedule`` (turns on chains of requests, advisories) and ``Events``.
- ``arrivals``: chat schedules, ``closed_loop`` (N users) and ``open_loop`` (timestamps).
- ``sharegpt_synth``: a ShareGPT-like generator calibrated to published statistics.
- ``agents``: multi-agent jobs on a call graph with next-hop advisories.
- ``traces``: loaders for Mooncake, RAGPulse, Azure LLM 2023, BurstGPT and ShareGPT files.
"""

from symphony_jax.workloads.advisory import AdvisoryConfig, Advisories
from symphony_jax.workloads.agents import CallGraph, Role, agent_schedule, metagpt_graph
from symphony_jax.workloads.arrivals import closed_loop, open_loop
from symphony_jax.workloads.schedule import ADVISORY, ARRIVAL, Events, Schedule
from symphony_jax.workloads.session import Session, Turn, Workload
from symphony_jax.workloads.sharegpt_synth import ShareGPTLike, sharegpt_like, truncate_to_context
from symphony_jax.workloads.think_time import EmpiricalGap, ExponentialGap, NoGap, ThinkTime

__all__ = [
    "ADVISORY", "ARRIVAL", "AdvisoryConfig", "Advisories", "CallGraph", "EmpiricalGap", "Events",
    "ExponentialGap", "NoGap", "Role", "Schedule", "Session", "ShareGPTLike", "ThinkTime", "Turn",
    "Workload", "agent_schedule", "closed_loop", "metagpt_graph", "open_loop", "sharegpt_like",
    "truncate_to_context",
]
