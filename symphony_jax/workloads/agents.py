"""Multi-agent workloads: jobs walking a call graph of LLM roles, with next-hop advisories.

In a multi-agent application (MetaGPT, arXiv 2308.00352: a product manager, an architect, a
project manager, engineers and QA engineers hand documents to each other), each role keeps its
own conversation, and a role's next call depends on everything that role has seen in the job.
SYMPHONY profiles the call graph offline and, when an upstream agent starts running, sends
advisories to *every possible next-hop agent* (NSDI'26 §3.1, Fig. 8); the hops not taken are
false advisories by construction.

Model. A job starts at its entry role and walks ``CallGraph.edges`` (caller -> callee with a
probability; ``END`` ends the job) for at most ``max_steps`` calls. Each call is a turn of the
session ``(job, role)``: session id ``job * num_roles + role``, turn index = how many times that
role has already run in the job. A call's new input is the role's instructions plus the
upstream call's answer (the entry call gets the job's task prompt instead). The callee's
request is sent ``tool_gap`` (exponential, mean ``CallGraph.tool_gap_s``: parsing, tools,
orchestration) after the caller finishes; jobs start as a Poisson process of rate
``jobs_per_s``. Every job is a chain of the schedule (closed loop within the job).

Advisories. When call ``u`` is sent, one advisory goes to the session of every callee of
``u``'s role (except ``END``), announcing that role's next turn. The one for the callee that is
actually called next is true and its lead is ``u``'s service time plus the tool gap, which the
executor decides; under a nominal decode of ``NOMINAL_TPOT_S`` per output token the default
graph's mean lead is about 5.8 s, the agent lead SYMPHONY reports (NSDI'26 Fig. 8; a
*calibrated target*). ``AdvisoryConfig`` drops and delays them as for chat; its extra false
advisories come within ``tool_gap_s`` after a call finishes. Lead scaling does not apply (the
lead is the upstream's run time).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from symphony_jax.workloads import _random
from symphony_jax.workloads._checks import check_number, cumsum_in_groups, fail, run_lengths
from symphony_jax.workloads.advisory import (AdvisoryConfig, Advisories, apply_config,
                                             false_advisories)
from symphony_jax.workloads.schedule import Schedule
from symphony_jax.workloads.session import Workload

END = "END"
NOMINAL_TPOT_S = 0.021  # decode time per token used to calibrate leads (SYMPHONY Fig. 19: 21.3 ms)
_HOP, _START, _TOOL_GAP, _TASK, _INSTRUCTIONS, _OUTPUT = 31, 32, 33, 34, 35, 36


@dataclasses.dataclass(frozen=True)
class Role:
    """An agent role: the tokens it adds to its own prompt and the tokens it answers."""

    name: str
    mean_instruction_tokens: float  # new tokens besides the upstream message (log-normal mean)
    mean_output_tokens: float  # answer length (log-normal mean)
    sigma: float = 0.5  # log-normal sigma of both

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or self.name == END:
            fail("Role", "name", self.name, f"a non-empty name other than {END!r}")
        check_number("Role", "mean_instruction_tokens", self.mean_instruction_tokens, 1.0)
        check_number("Role", "mean_output_tokens", self.mean_output_tokens, 1.0)
        check_number("Role", "sigma", self.sigma, 0.0, 4.0)


@dataclasses.dataclass(frozen=True)
class CallGraph:
    """Roles and who calls whom, with probabilities (each caller's add up to 1)."""

    roles: tuple[Role, ...]
    edges: tuple[tuple[str, str, float], ...]  # (caller, callee or END, probability)
    entry: str
    tool_gap_s: float = 0.8  # mean delay from a caller's finish to its callee's request (s)
    mean_task_tokens: float = 300.0  # the job's task prompt, given to the entry role

    def __post_init__(self):
        owner = "CallGraph"
        object.__setattr__(self, "roles", tuple(self.roles))
        object.__setattr__(self, "edges", tuple(tuple(e) for e in self.edges))
        names = [r.name for r in self.roles]
        if not names or len(set(names)) != len(names):
            fail(owner, "roles", names, "at least one role, names distinct")
        if self.entry not in names:
            fail(owner, "entry", self.entry, f"one of {names}")
        for caller, callee, p in self.edges:
            if caller not in names or (callee not in names and callee != END):
                fail(owner, "edges", (caller, callee, p), f"roles among {names} (callee or END)")
            check_number(owner, f"edges[{caller}->{callee}]", p, 0.0, 1.0)
        totals = self.transitions.sum(axis=1)
        if not np.allclose(totals, 1.0, atol=1e-9):
            bad = names[int(np.argmax(np.abs(totals - 1.0)))]
            fail(owner, "edges", bad, "outgoing probabilities of every role adding up to 1")
        check_number(owner, "tool_gap_s", self.tool_gap_s, 0.0)
        check_number(owner, "mean_task_tokens", self.mean_task_tokens, 1.0)

    @property
    def transitions(self) -> np.ndarray:
        """f64[K, K + 1]: probability that role i calls role j next (last column: END)."""
        names = [r.name for r in self.roles] + [END]
        matrix = np.zeros((len(self.roles), len(names)))
        for caller, callee, p in self.edges:
            matrix[names.index(caller), names.index(callee)] += p
        return matrix


def metagpt_graph() -> CallGraph:
    """A MetaGPT-like software team; the revision probabilities are illustrative, not measured.

    Output means are chosen so that the mean next-hop lead is about 5.8 s at ``NOMINAL_TPOT_S``.
    """
    roles = (Role("ProductManager", 150, 260), Role("Architect", 150, 260),
             Role("ProjectManager", 100, 200), Role("Engineer", 200, 280),
             Role("QaEngineer", 100, 150))
    edges = (("ProductManager", "Architect", 1.0),
             ("Architect", "ProjectManager", 0.9), ("Architect", "ProductManager", 0.1),
             ("ProjectManager", "Engineer", 1.0),
             ("Engineer", "QaEngineer", 0.8), ("Engineer", END, 0.2),
             ("QaEngineer", "Engineer", 0.5), ("QaEngineer", END, 0.5))
    return CallGraph(roles, edges, entry="ProductManager")


def agent_schedule(graph: CallGraph, num_jobs: int, *, jobs_per_s: float = 0.5,
                   advisories: AdvisoryConfig = AdvisoryConfig(), max_steps: int = 32,
                   seed: int = 0) -> Schedule:
    """``num_jobs`` jobs walking ``graph``; one chain per job, advisories to every next hop."""
    owner = "agent_schedule"
    for field, value in (("num_jobs", num_jobs), ("max_steps", max_steps)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            fail(owner, field, value, "an integer >= 1")
    check_number(owner, "jobs_per_s", jobs_per_s, 0.0, low_open=True)
    if advisories.lead_scale != 1.0:
        fail(owner, "advisories.lead_scale", advisories.lead_scale,
             "1.0 (an agent's lead is its upstream's run time)")
    job, step, role = _walk(graph, num_jobs, max_steps, seed)
    num_roles = len(graph.roles)
    session = job * num_roles + role
    roles_out = np.array([r.mean_output_tokens for r in graph.roles])[role]
    roles_in = np.array([r.mean_instruction_tokens for r in graph.roles])[role]
    sigma = np.array([r.sigma for r in graph.roles])[role]
    output = _random.lognormal_tokens(roles_out, sigma, seed, _OUTPUT, job, step)
    first = step == 0  # rows are in (job, step) order: a row's upstream is the row before it
    upstream = np.where(first, _random.lognormal_tokens(graph.mean_task_tokens, 0.5, seed,
                                                        _TASK, job, step), np.roll(output, 1))
    inputs = _random.lognormal_tokens(roles_in, sigma, seed, _INSTRUCTIONS, job, step) + upstream
    # Arrays so far are in call order (job, step); the workload's rows are in (session, turn)
    # order: workload row i is call order[i], and call c is workload row rows_of[c].
    order = np.lexsort((step, session))
    rows_of = np.empty_like(order)
    rows_of[order] = np.arange(len(order))
    workload = Workload(session[order], inputs[order], output[order])
    turn = workload.turn_index[rows_of]

    start = np.cumsum(_random.exponential(1.0 / jobs_per_s, seed, _START,
                                          np.arange(num_jobs, dtype=np.int64)))
    tool_gap = _random.exponential(graph.tool_gap_s, seed, _TOOL_GAP, job, step) \
        if graph.tool_gap_s > 0 else np.zeros(len(job))
    gap = np.where(first, start[job] - start[0], tool_gap)  # the first job starts at time 0
    prev = np.where(first, -1, rows_of[np.maximum(np.arange(len(job)) - 1, 0)])

    intended, keys = _hop_advisories(graph, job, step, role, session, turn, rows_of, prev, gap)
    # from here on, arrays are in workload row order
    sent = apply_config(intended, keys, advisories, seed, prev[order], gap[order])
    per_row = float(np.sum(intended.target_row >= 0)) / max(len(job), 1)
    extras = false_advisories(workload.session_id, workload.turn_index,
                              np.full(len(job), graph.tool_gap_s), per_row, advisories, seed,
                              None)
    return Schedule(workload, job[order], step[order], gap[order],
                    Advisories.concat(sent, extras))


def _walk(graph: CallGraph, num_jobs: int, max_steps: int,
          seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every job's calls as rows (job, step, role index) in (job, step) order."""
    cumulative = np.cumsum(graph.transitions, axis=1)
    end = len(graph.roles)
    jobs = np.arange(num_jobs, dtype=np.int64)
    current = np.full(num_jobs, [r.name for r in graph.roles].index(graph.entry))
    visits = []
    for s in range(max_steps):
        active = current != end
        visits.append((jobs[active], np.full(int(active.sum()), s), current[active]))
        u = _random.uniform(seed, _HOP, jobs[active], s)
        nxt = (u[:, None] > cumulative[current[active]]).sum(axis=1)
        current[active] = np.minimum(nxt, end)
    job, step, role = (np.concatenate(parts).astype(np.int64) for parts in zip(*visits))
    order = np.lexsort((step, job))
    return job[order], step[order], role[order]


def _hop_advisories(graph: CallGraph, job, step, role, session, turn, rows_of, prev,
                    gap) -> tuple[Advisories, tuple[np.ndarray, ...]]:
    """At each call's arrival, one advisory per possible callee (rows in (job, step) order)."""
    num_roles = len(graph.roles)
    callees = graph.transitions[:, :num_roles] > 0  # bool[K, K]
    # calls of each role so far in the job, this one included
    counts = cumsum_in_groups(np.eye(num_roles, dtype=np.int64)[role], run_lengths(job))
    upstream, callee = np.nonzero(callees[role])
    following = np.append(job[1:] == job[:-1], False)  # the next row is the same job's next call
    nxt = np.minimum(np.arange(len(job)) + 1, len(job) - 1)
    taken = following[upstream] & (role[nxt[upstream]] == callee)
    target = np.where(taken, rows_of[nxt[upstream]], -1)
    advisories = Advisories(
        trigger_row=prev[upstream], offset_s=gap[upstream],
        session_id=job[upstream] * num_roles + callee,
        turn_index=counts[upstream, callee], target_row=target,
        late=np.zeros(len(upstream), bool))
    return advisories, (session[upstream], turn[upstream], callee)
