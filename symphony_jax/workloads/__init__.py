"""Workloads: multi-turn sessions, think times, advisory requests, agents and real traces.

numpy only (no JAX): the real cluster and the simulator consume the same objects.

- ``session``: ``Turn``, ``Session`` and the columnar ``Workload`` (the contract).
- ``think_time``: reading + idle + typing time between turns (``ThinkTime``).
- ``advisory``: advisory tables and the knobs that drop, delay and fake them.
- ``schedule``: ``Schedule`` (turns on chains of requests, advisories) and ``Events``.
- ``arrivals``: chat schedules, ``closed_loop`` (N users) and ``open_loop`` (timestamps).
- ``sharegpt_synth``: a ShareGPT-like generator calibrated to published statistics, and its
  long-document variant ``LONG_CHAT``.
- ``agents``: multi-agent jobs on a call graph with next-hop advisories.
- ``traces``: loaders for Mooncake, RAGPulse, Azure LLM 2023, BurstGPT and ShareGPT files.

Typical use by an executor (the simulator or the real cluster)::

    from symphony_jax import workloads as wl

    work = wl.sharegpt_like(1000, seed=0)                  # or traces.to_workload(...)
    schedule = wl.closed_loop(work, num_users=64,
                              advisories=wl.AdvisoryConfig(drop_fraction=0.1), seed=0)
    events = schedule.initial_events()                     # arrivals and advisories, in time
    ...                                                    # serve; when rows finish:
    events = schedule.after_finish(finished_rows, finish_times)

``Events.row`` indexes ``schedule.workload`` (its ``prompt_tokens``, ``history_tokens``,
``output_tokens``); an advisory's ``row`` is -1 when no such request follows.
"""

from symphony_jax.workloads.advisory import AdvisoryConfig, Advisories
from symphony_jax.workloads.agents import CallGraph, Role, agent_schedule, metagpt_graph
from symphony_jax.workloads.arrivals import closed_loop, open_loop
from symphony_jax.workloads.schedule import ADVISORY, ARRIVAL, Events, Schedule
from symphony_jax.workloads.session import Session, Turn, Workload
from symphony_jax.workloads.sharegpt_synth import (LONG_CHAT, ShareGPTLike, sharegpt_like,
                                                   truncate_to_context)
from symphony_jax.workloads.think_time import EmpiricalGap, ExponentialGap, NoGap, ThinkTime

__all__ = [
    "ADVISORY", "ARRIVAL", "AdvisoryConfig", "Advisories", "CallGraph", "EmpiricalGap", "Events",
    "ExponentialGap", "LONG_CHAT", "NoGap", "Role", "Schedule", "Session", "ShareGPTLike",
    "ThinkTime", "Turn", "Workload", "agent_schedule", "closed_loop", "metagpt_graph", "open_loop",
    "sharegpt_like", "truncate_to_context",
]
