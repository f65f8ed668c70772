"""Scheduler benchmark: the jitted scheduler against the plain-Python one, same decisions.

Workload (decode-heavy, steady): ``arrivals`` requests every ``arrive_every`` steps, turns of
multi-turn sessions taken in rotation (each prompt extends its session's history; a session's
first turn brings a history already under way), outputs ending at ``max_new_tokens``, retention
``keep``: idle sessions hold their slots and blocks until a slot or memory is needed, and the
pool is tight enough that running sequences are preempted now and then. Both schedulers run the
same arrivals, step by step interleaved (machine noise hits both alike), and must make the same
decisions (the batch counts every step, the request tables at the end).

1. One node (256 slots, 16,384 blocks): per step, admission on arrival steps, the jitted
   ``schedule``, the host reading the plan's counts to pick its bucket, the layout
   (``memory.layout.build``) and ``commit``, waited for, against ``PyScheduler``'s admit,
   schedule, numpy layout put on the device, and commit.
2. 8 nodes x 256 slots, the simulator's shape: the same step ``vmap``ped over stacked node
   states (the layout at the largest node's bucket) against 8 Python schedulers.
3. Decode-only multi-step: K schedule + commit steps in one jitted ``lax.fori_loop`` (no host
   round trip) from a state where every active sequence decodes, against the Python
   scheduler's K schedule + commit steps; the cost per step for K in 1, 8, 32.

Every layout bucket is compiled before timing (the buckets come from an untimed run of the
Python scheduler, which decides the same). Usage: ``python experiments/bench/scheduler.py
[--quick] [--out FILE.md]``.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import _report  # beside this script
from block_table import time_interleaved  # beside this script
from symphony_jax.config import CacheConfig, EngineConfig, SchedulerConfig, model_preset
from symphony_jax.scheduler import admission, batch, step
from symphony_jax.scheduler import state as S
from symphony_jax.scheduler.policy import Policy
from symphony_jax.scheduler.py_scheduler import PyScheduler, Request, as_new_requests

POLICY = Policy(retention="keep")


@dataclasses.dataclass(frozen=True)
class Workload:
    num_slots: int = 256
    num_blocks: int = 16_384
    block_size: int = 16
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    sessions: int = 400  # in rotation: a session's next turn comes after all the others'
    arrive_every: int = 5
    arrivals: int = 2  # requests per arrival step (the admission batch)
    new_input: tuple[int, int] = (32, 256)  # tokens of a turn's new input (uniform range)
    output: tuple[int, int] = (128, 512)  # tokens a turn generates
    first_history: int = 3584  # a session's first turn brings up to this many tokens of history
    steps: int = 800  # per run; the first `warmup` are not timed (the pool fills)
    warmup: int = 500
    nodes: int = 8
    node_steps: int = 700
    node_warmup: int = 500
    decode_steps: int = 256  # steps of each decode-only run (a multiple of every K)
    ks: tuple[int, ...] = (1, 8, 32)

    def config(self) -> EngineConfig:
        return EngineConfig(
            model_preset("tiny"),
            CacheConfig(block_size=self.block_size, num_device_blocks=self.num_blocks),
            SchedulerConfig(max_num_seqs=self.max_num_seqs,
                            max_num_batched_tokens=self.max_num_batched_tokens,
                            max_model_len=self.max_model_len, num_slots=self.num_slots))


QUICK = Workload(num_slots=16, num_blocks=256, max_num_seqs=8, max_num_batched_tokens=256,
                 max_model_len=512, sessions=24, arrive_every=4, new_input=(8, 64),
                 output=(8, 48), first_history=128, steps=60, warmup=20, nodes=8, node_steps=40,
                 node_warmup=10, decode_steps=32)


def make_arrivals(w: Workload, steps: int, seed: int) -> dict[int, list[Request]]:
    """The requests arriving at each arrival step (independent of what the scheduler does)."""
    rng = np.random.default_rng(seed)
    uniform = lambda bounds: int(rng.integers(bounds[0], bounds[1] + 1))
    session_ids = list(range(w.sessions))
    history = {s: int(rng.integers(0, w.first_history + 1)) for s in session_ids}
    rotation, arrivals, next_id = iter(()), {}, 0
    for i in range(0, steps, w.arrive_every):
        arrivals[i] = []
        for _ in range(w.arrivals):
            k = next(rotation, None)
            if k is None:
                rotation = iter(rng.permutation(w.sessions).tolist())
                k = next(rotation)
            new_input, output = uniform(w.new_input), uniform(w.output)
            if history[session_ids[k]] + new_input + output > w.max_model_len:
                session_ids[k] += w.sessions  # the conversation is over: a new session
                history[session_ids[k]] = 0
            session = session_ids[k]
            prompt = history[session] + new_input
            arrivals[i].append(Request(next_id, prompt, output, session_id=session,
                                       history_len=history[session], arrival=float(i)))
            history[session], next_id = prompt + output, next_id + 1
    return arrivals


def stack(trees):
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


class JittedNodes:
    """One node's scheduler state, or a stack of nodes' (``vmap``), stepped through arrivals."""

    def __init__(self, w: Workload, arrivals: list[dict[int, list[Request]]]):
        config, stacked = w.config(), len(arrivals) > 1
        limits = config.scheduler
        # One node calls the transitions as they are (sharing their compilations).
        wrap = (lambda f, **axes: jax.jit(jax.vmap(f, **axes), donate_argnums=0)) if stacked \
            else (lambda f, **_: f)
        self.limits = limits
        self.state = stack([S.init(config)] * len(arrivals)) if stacked else S.init(config)
        self.new = {i: (stack if stacked else (lambda x: x[0]))(
            [as_new_requests(a[i]) for a in arrivals]) for i in arrivals[0]}
        self.stop = jnp.zeros(config.scheduler.slots, bool)
        self.admit = wrap(functools.partial(admission.admit, limits=limits))
        self.schedule = wrap(functools.partial(step.schedule, limits=limits, policy=POLICY),
                             in_axes=(0, None))
        self.commit = wrap(functools.partial(step.commit, policy=POLICY),
                           in_axes=(0, 0, None, None))

        @functools.partial(jax.jit, static_argnames=("num_seqs", "num_tokens"))
        def layout(table, plan, num_seqs, num_tokens):
            build = functools.partial(batch.layout, num_seqs=num_seqs, num_tokens=num_tokens)
            return (jax.vmap(build) if stacked else build)(table, plan)

        self.layout = layout
        self.counts: dict[int, tuple[int, int, bool]] = {}  # step -> the nodes' widest counts

    def compile_layouts(self, buckets: set[tuple[int, int]]) -> None:
        """Compile the layout for every bucket, on a throwaway plan."""
        state = jax.tree.map(jnp.copy, self.state)
        state, plan = self.schedule(state, 0.0)
        for num_seqs, num_tokens in buckets:
            jax.block_until_ready(self.layout(state.blocks, plan, num_seqs, num_tokens))

    def __call__(self, i: int):
        admitted = ()
        if i in self.new:
            self.state, *admitted = self.admit(self.state, self.new[i])
        self.state, plan = self.schedule(self.state, float(i))
        num_seqs, num_tokens, decode_only = jax.device_get(
            (plan.num_seqs, plan.num_tokens, plan.decode_only))
        counts = int(np.max(num_seqs)), int(np.max(num_tokens)), bool(np.all(decode_only))
        self.counts[i] = counts
        layout = self.layout(self.state.blocks, plan, *batch.shape(*counts, self.limits))
        self.state, finished = self.commit(self.state, plan, self.stop, float(i))
        return self.state, layout, finished, admitted


def widest(a: tuple[int, int, bool], b: tuple[int, int, bool]) -> tuple[int, int, bool]:
    """The counts of a batch holding both plans' (sequences, tokens, decode only)."""
    return max(a[0], b[0]), max(a[1], b[1]), a[2] and b[2]


class PythonNodes:
    """One ``PyScheduler`` per node, stepped through the same arrivals."""

    def __init__(self, w: Workload, arrivals: list[dict[int, list[Request]]],
                 expected_counts: dict[int, tuple[int, int, bool]] | None = None):
        config = w.config()
        self.limits, self.arrivals = config.scheduler, arrivals
        self.schedulers = [PyScheduler(config, POLICY) for _ in arrivals]
        self.stop = [False] * config.scheduler.slots
        self.expected_counts = expected_counts  # the jitted side's, checked step by step
        self.plans: list[list] = []

    def __call__(self, i: int):
        layouts, largest = [], (0, 0, True)
        for scheduler, arrivals in zip(self.schedulers, self.arrivals):
            if i in arrivals:
                scheduler.admit(arrivals[i])
            plan = scheduler.schedule(float(i))
            counts = (plan.num_seqs, plan.num_tokens, plan.decode_only)
            largest = widest(largest, counts)
            layouts.append(scheduler.layout(plan, *batch.shape(*counts, self.limits)))
            scheduler.commit(plan, self.stop, float(i))
        if self.expected_counts is not None:
            assert self.expected_counts.pop(i) == largest, f"step {i}: the schedulers disagree"
        return layouts

    def dry_run(self, steps: int) -> tuple[set[tuple[int, int]], collections.Counter]:
        """Run every step untimed: the layout buckets the jitted side will need (the largest
        node's counts) and the workload's statistics."""
        buckets, stats = set(), collections.Counter()
        for i in range(steps):
            largest = (0, 0, True)
            for scheduler, arrivals in zip(self.schedulers, self.arrivals):
                if i in arrivals:
                    stats.update(S.REASONS[r] for r in scheduler.admit(arrivals[i])[1])
                plan = scheduler.schedule(float(i))
                largest = widest(largest, (plan.num_seqs, plan.num_tokens, plan.decode_only))
                stats.update(steps=1, decode_only=plan.decode_only, seqs=plan.num_seqs,
                             preempted=sum(plan.preempted), evicted=sum(plan.evicted))
                scheduler.commit(plan, self.stop, float(i))
            buckets.add(batch.shape(*largest, self.limits))
        return buckets, stats


def same_tables(jitted: JittedNodes, python: PythonNodes) -> None:
    status = np.asarray(jitted.state.requests.status).reshape(len(python.schedulers), -1)
    cached = np.asarray(jitted.state.blocks.num_tokens[..., 0, :]).reshape(status.shape)
    for node, scheduler in enumerate(python.schedulers):
        assert status[node].tolist() == [slot.status for slot in scheduler.slots], "diverged"
        assert cached[node].tolist() == scheduler.cached_tokens, "the workloads diverged"


def bench_nodes(w: Workload, nodes: int, steps: int, warmup: int):
    """Per-step times of both sides over ``nodes`` nodes, and the workload's statistics."""
    arrivals = [make_arrivals(w, steps, seed=node) for node in range(nodes)]
    buckets, stats = PythonNodes(w, arrivals).dry_run(steps)
    jitted = JittedNodes(w, arrivals)
    jitted.compile_layouts(buckets)
    python = PythonNodes(w, arrivals, expected_counts=jitted.counts)
    times = time_interleaved(dataclasses.replace(w, steps=steps, warmup=warmup),
                             jitted=jitted, python=python)
    same_tables(jitted, python)
    return times, stats


@functools.partial(jax.jit, donate_argnums=0, static_argnames=("num_steps", "limits"))
def decode_steps(state: S.SchedulerState, now, num_steps: int, limits: SchedulerConfig):
    """``num_steps`` schedule + commit steps at times now, now + 1, ... with no stop flags;
    also whether every step was decode-only (or empty)."""
    stop = jnp.zeros(state.num_slots, bool)

    def one(i, carry):
        state, decode_only = carry
        t = now + i
        state, plan = step.schedule(state, t, limits=limits, policy=POLICY)
        state, _ = step.commit(state, plan, stop, t, policy=POLICY)
        return state, decode_only & (plan.decode_only | (plan.num_seqs == 0))

    return jax.lax.fori_loop(0, num_steps, one, (state, jnp.bool_(True)))


def decoding_state(w: Workload) -> tuple[S.SchedulerState, PyScheduler, float]:
    """Both schedulers with ``max_num_seqs`` sequences decoding (prompts done, nothing
    waiting), outputs long enough that some but not all finish in ``decode_steps`` steps;
    and the time of the next step."""
    config, rng = w.config(), np.random.default_rng(0)
    limits, state, python = config.scheduler, S.init(config), PyScheduler(config, POLICY)
    longest = min(2 * w.decode_steps, w.max_model_len - w.new_input[1])
    requests = [Request(i, int(rng.integers(*w.new_input)), int(rng.integers(1, longest)),
                        session_id=i) for i in range(w.max_num_seqs)]
    for k in range(0, len(requests), w.arrivals):
        state = admission.admit(state, as_new_requests(requests[k: k + w.arrivals]),
                                limits=limits)[0]
        python.admit(requests[k: k + w.arrivals])
    now = 0.0
    while python.waiting or not all(python.slots[s].num_generated for s in python.running):
        state, plan = step.schedule(state, now, limits=limits, policy=POLICY)
        state = step.commit(state, plan, jnp.zeros(w.num_slots, bool), now, policy=POLICY)[0]
        python.commit(python.schedule(now), [False] * w.num_slots, now)
        now += 1.0
    return state, python, now


def bench_decode_steps(w: Workload) -> dict[int, dict[str, np.ndarray]]:
    """Seconds per step of K-step calls, for each K: jitted loop vs Python steps."""
    limits, stop, out = w.config().scheduler, [False] * w.num_slots, {}
    for k in w.ks:
        state, python, start = decoding_state(w)
        jax.block_until_ready(decode_steps(jax.tree.map(jnp.copy, state), start, k, limits))
        jitted = dict(state=state)

        def jitted_call(c: int):
            jitted["state"], decode_only = decode_steps(jitted["state"], start + c * k, k,
                                                        limits)
            jitted["decode_only"] = decode_only
            return decode_only

        def python_call(c: int):
            for j in range(k):
                now = start + c * k + j
                python.commit(python.schedule(now), stop, now)

        calls = w.decode_steps // k
        times = time_interleaved(dataclasses.replace(w, steps=calls, warmup=0),
                                 jitted=jitted_call, python=python_call)
        assert bool(jitted["decode_only"]), "a step was not decode-only"
        generated = np.asarray(jitted["state"].requests.num_generated).tolist()
        assert generated == [slot.num_generated for slot in python.slots], "diverged"
        out[k] = {name: t / k for name, t in times.items()}
    return out


def report(w: Workload) -> str:
    us = lambda s: f"{s * 1e6:,.1f} us"
    one, stats = bench_nodes(w, 1, w.steps, w.warmup)
    many, _ = bench_nodes(w, w.nodes, w.node_steps, w.node_warmup)
    multi = bench_decode_steps(w)
    rejected = sum(v for k, v in stats.items() if k in S.REASONS[1:])
    lines = [
        f"JAX {jax.__version__} on {jax.devices()[0].platform} ({_report.machine()}), "
        f"{datetime.date.today()}. {w.num_slots} slots, {w.num_blocks} blocks of "
        f"{w.block_size}, max_model_len {w.max_model_len} ({w.config().max_blocks_per_seq} "
        f"blocks per sequence), max_num_seqs {w.max_num_seqs}, "
        f"max_num_batched_tokens {w.max_num_batched_tokens}; policy fcfs, decode_first, "
        f"chunked, retention keep. {w.arrivals} requests every {w.arrive_every} steps from "
        f"{w.sessions} sessions in rotation.",
        "",
        f"One node over {stats['steps']} steps: {stats['seqs'] / stats['steps']:.0f} sequences "
        f"per step on average, {stats['decode_only'] / stats['steps']:.0%} of steps "
        f"decode-only, {stats['preempted']} preemptions, {stats['evicted']} idle sessions "
        f"evicted, {rejected} of {rejected + stats[S.REASONS[0]]} requests rejected. Mean and "
        f"median per step after {w.warmup} warm-up steps (the pool fills); the jitted step "
        "includes the host reading the plan's counts to pick the layout bucket.",
        "",
        "| nodes | jitted mean | python mean | python / jitted | jitted median | "
        "python median |",
        "|---|---|---|---|---|---|",
    ]
    for name, t in (("1", one), (f"{w.nodes} (vmap)", many)):
        lines.append(f"| {name} | {us(t['jitted'].mean())} | {us(t['python'].mean())} | "
                     f"{t['python'].mean() / t['jitted'].mean():.2f}x | "
                     f"{us(np.median(t['jitted']))} | {us(np.median(t['python']))} |")
    lines += ["", f"Decode-only steps ({w.max_num_seqs} sequences decoding, some finishing), "
              f"{w.decode_steps} steps in calls of K steps: mean per step.", "",
              "| K | jitted (one fori_loop) | python | python / jitted |", "|---|---|---|---|"]
    for k, t in multi.items():
        lines.append(f"| {k} | {us(t['jitted'].mean())} | {us(t['python'].mean())} | "
                     f"{t['python'].mean() / t['jitted'].mean():.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    return _report.main(__file__, __doc__, lambda quick: report(QUICK if quick else Workload()),
                        argv)


if __name__ == "__main__":
    main()
