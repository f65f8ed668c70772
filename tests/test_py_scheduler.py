"""The plain-Python scheduler against the jitted one: same inputs, same decisions.

Both are driven by the same random arrivals, steps (time advancing by random amounts), stop flags
and aborts, in the configurations and policy mixes of test_scheduler_stateful.py plus chunked
prefill_first by priority over two layer groups. After every transition: identical admission
slots and reasons, plans (every field) and finished slots; identical per-slot request fields and
cached tokens; block tables and step layouts identical up to a renaming of each group's block
ids (a bijection, the null block fixed).

At the end: admission edge cases judged by both, and waiting sessions whose retained K,V fills
the pool (it must give way, or nothing would ever run).
"""

import collections
import dataclasses

import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import settings
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule)

import test_scheduler_stateful as stateful
from symphony_jax.scheduler import admission, batch, step
from symphony_jax.scheduler import state as S
from symphony_jax.scheduler.policy import Policy
from symphony_jax.scheduler.py_scheduler import PyScheduler, Request, as_new_requests

R, N = stateful.LIMITS.slots, stateful.N
# Besides test_scheduler_stateful's requests (many of them malformed), well-formed long ones of
# more sessions: the pool fills, idle sessions are evicted and running ones preempted.
long_requests = st.lists(st.fixed_dictionaries(dict(
    session=st.sampled_from([S.NO_SESSION, 0, 1, 2, 3, 4, 5]), prompt=st.integers(12, 36),
    history=st.integers(0, 11), new_tokens=st.integers(1, 4), priority=st.integers(0, 2))),
    min_size=1, max_size=N)
ABORTS = 1  # slots per abort call
LAYOUT_FIELDS = ("seq_slots", "query_start_loc", "context_lens", "token_slots", "positions",
                 "logits_indices")


def renaming(ours: np.ndarray, theirs: np.ndarray, mapping: dict[int, int]) -> None:
    """Check that block ids ``ours`` and ``theirs`` correspond one to one (extending
    ``mapping``, ours -> theirs), the null block to itself."""
    for a, b in zip(ours.ravel().tolist(), theirs.ravel().tolist()):
        assert mapping.setdefault(a, b) == b, f"block {a} is {mapping[a]} and {b} in the other"
    assert len(set(mapping.values())) == len(mapping), "two blocks map to one"
    assert mapping.get(0, 0) == 0, "the null block is renamed"


class EquivalenceMachine(RuleBasedStateMachine):
    config = stateful.CONFIG
    policy = stateful.SchedulerMachine.policy

    def __init__(self):
        super().__init__()
        self.state = S.init(self.config)
        self.py = PyScheduler(self.config, self.policy)
        self.now, self.next_id = 0.0, 0

    @property
    def limits(self):
        return self.config.scheduler

    @initialize(batch=long_requests)
    def first_arrivals(self, batch):
        self.admit(batch)

    @rule(batch=st.one_of(stateful.requests, long_requests, long_requests))
    def admit(self, batch):
        requests = [Request(self.next_id + i, r["prompt"], r["new_tokens"], r["session"],
                            r["history"], r["priority"], self.now) for i, r in enumerate(batch)]
        self.next_id += len(batch)
        self.state, slots, reasons = admission.admit(self.state, as_new_requests(requests, N),
                                                     limits=self.limits)
        self.admitted = self.py.admit(requests)
        assert (np.asarray(slots)[: len(batch)].tolist(),
                np.asarray(reasons)[: len(batch)].tolist()) == self.admitted

    @precondition(lambda self: self.py.running or self.py.waiting or self.py.idle)
    @rule(stops=st.lists(st.booleans(), min_size=R, max_size=R),
          dt=st.sampled_from([0.0, 0.1, 1.0, 2.5]))
    def step(self, stops, dt):
        self.state, plan = step.schedule(self.state, self.now, limits=self.limits,
                                         policy=self.policy)
        self.plan = py_plan = self.py.schedule(self.now)
        for field in dataclasses.fields(step.StepPlan):
            np.testing.assert_array_equal(np.asarray(getattr(plan, field.name)),
                                          np.asarray(getattr(py_plan, field.name)), field.name)
        self.check_layouts(plan, py_plan)
        self.state, finished = step.commit(self.state, plan, jnp.asarray(stops), self.now,
                                           policy=self.policy)
        assert np.asarray(finished).tolist() == self.py.commit(py_plan, stops, self.now)
        self.now += dt

    def check_layouts(self, plan, py_plan):
        """At the plan's bucket and at the largest one."""
        counts = (py_plan.num_seqs, py_plan.num_tokens, py_plan.decode_only)
        largest = (self.limits.max_num_seqs, self.limits.max_num_batched_tokens)
        for num_seqs, num_tokens in {batch.shape(*counts, self.limits), largest}:
            ours = batch.layout(self.state.blocks, plan, num_seqs, num_tokens)
            theirs = self.py.layout(py_plan, num_seqs, num_tokens)
            for name in LAYOUT_FIELDS:
                np.testing.assert_array_equal(getattr(ours, name), getattr(theirs, name), name)
            bs = self.config.cache.block_size
            mapping, their_mapping = np.asarray(ours.slot_mapping), np.asarray(theirs.slot_mapping)
            np.testing.assert_array_equal(mapping % bs, their_mapping % bs, "slot offsets")
            renamed = self.block_renamings()
            renaming(np.asarray(ours.block_tables), np.asarray(theirs.block_tables), renamed)
            out_of_range = self.config.cache.num_device_blocks
            renaming(mapping // bs, their_mapping // bs, renamed | {out_of_range: out_of_range})

    @rule(slots=st.lists(st.integers(-1, R), max_size=ABORTS))
    def abort(self, slots):
        padded = np.full(ABORTS, R, np.int32)
        padded[: len(slots)] = slots
        self.state = admission.abort(self.state, jnp.asarray(padded))
        self.py.abort(slots)

    def block_renamings(self) -> dict[int, int]:
        """The renaming of block ids between the two tables, over every group (checked)."""
        ids, names = np.asarray(self.state.blocks.block_ids), {}
        for g, rows in enumerate(self.py.allocator.blocks):
            renaming(ids[g], self.py.rows[g, :R], names)
            assert [len(b) for b in rows] == [
                np.count_nonzero(row) for row in self.py.rows[g, :R]]
        return names

    @invariant()
    def same_requests_and_blocks(self):
        r = self.state.requests
        for field in dataclasses.fields(S.Requests):
            column = np.asarray(getattr(r, field.name))
            theirs = np.array([getattr(slot, field.name) for slot in self.py.slots], column.dtype)
            np.testing.assert_array_equal(column, theirs, field.name)
        blocks = self.state.blocks
        assert np.asarray(blocks.num_tokens).tolist() == self.py.allocator.tokens
        assert int(blocks.free_top) == self.py.allocator.num_free_blocks
        self.block_renamings()


class PriorityPrefillFirstDropMachine(EquivalenceMachine):
    config = dataclasses.replace(stateful.CONFIG,
                                 scheduler=stateful.PriorityPrefillFirstDropMachine.limits)
    policy = stateful.PriorityPrefillFirstDropMachine.policy


class TTLMachine(EquivalenceMachine):
    policy = stateful.TTLMachine.policy


class TwoGroupsPriorityPrefillFirstMachine(EquivalenceMachine):
    config = dataclasses.replace(stateful.CONFIG, cache=dataclasses.replace(
        stateful.CONFIG.cache, num_layer_groups=2))
    policy = Policy(order="priority", prefill="prefill_first", retention="keep")


STEPS = settings(max_examples=12, stateful_step_count=50)
TestEquivalence = EquivalenceMachine.TestCase
TestEquivalencePriorityPrefillFirstDrop = PriorityPrefillFirstDropMachine.TestCase
TestEquivalenceTTL = TTLMachine.TestCase
TestEquivalenceTwoGroups = TwoGroupsPriorityPrefillFirstMachine.TestCase
for case in (TestEquivalence, TestEquivalencePriorityPrefillFirstDrop, TestEquivalenceTTL,
             TestEquivalenceTwoGroups):
    case.settings = STEPS
del case  # a TestCase under another name would be collected again


MACHINES = (EquivalenceMachine, PriorityPrefillFirstDropMachine, TTLMachine,
            TwoGroupsPriorityPrefillFirstMachine)


@pytest.mark.parametrize("machine_class", MACHINES, ids=lambda m: m.__name__)
def test_multi_turn_sessions_under_memory_pressure(machine_class):
    """A seeded run of multi-turn sessions (each turn's prompt extends the session's history)
    that keeps the pool full, checked after every transition as in the state machines."""
    rng, machine, seen = np.random.default_rng(0), machine_class(), collections.Counter()
    history = {}  # session -> tokens of its last admitted turn
    for _ in range(100):
        batch = []
        for session in rng.choice(6, rng.integers(0, N + 1), replace=False).tolist():
            new_input, new_tokens = int(rng.integers(4, 17)), int(rng.integers(1, 9))
            prior = history.get(session, 0)
            if prior + new_input + new_tokens > machine.limits.max_model_len:
                prior = 0  # the session starts over
            batch.append(dict(session=session, prompt=prior + new_input, history=prior,
                              new_tokens=new_tokens, priority=int(rng.integers(0, 3))))
        machine.admit(batch)
        slots, reasons = machine.admitted
        for request, slot, reason in zip(batch, slots, reasons):
            if reason == S.ADMITTED:
                history[request["session"]] = request["prompt"] + request["new_tokens"]
                seen["reused K,V"] += machine.py.slots[slot].cached_at_admission > 0
        if rng.random() < 0.03:
            machine.abort([int(rng.integers(0, R))])
        machine.step((rng.random(R) < 0.05).tolist(), float(rng.choice([0.1, 1.0])))
        machine.same_requests_and_blocks()
        seen["preempted"] += sum(machine.plan.preempted)
    assert seen["preempted"], "the run never filled the pool"
    assert seen["reused K,V"] or machine.policy.retention == "drop"


# -- Edge cases ---------------------------------------------------------------------------------

EDGE_REASONS = [
    pytest.param(Request(0, prompt_len=10, max_new_tokens=2**31 - 5), S.TOO_LONG,
                 id="max_new_tokens near int32 max"),
    pytest.param(Request(0, prompt_len=2**31 - 1, max_new_tokens=1), S.TOO_LONG,
                 id="prompt_len near int32 max"),
    pytest.param(Request(0, prompt_len=5, max_new_tokens=3, priority=-1), S.ADMITTED,
                 id="negative priority"),
]


@pytest.mark.parametrize("request_, reason", EDGE_REASONS)
def test_admission_edge_cases(request_, reason):
    py_slots, py_reasons = PyScheduler(stateful.CONFIG, Policy()).admit([request_])
    _, slots, reasons = admission.admit(S.init(stateful.CONFIG), as_new_requests([request_]),
                                        limits=stateful.LIMITS)
    assert py_reasons == [int(reasons[0])] == [reason]
    assert py_slots == [int(slots[0])]


def stalled_machine() -> EquivalenceMachine:
    """Three sessions retain 9 + 9 + 5 of the 23 blocks; then their next turns all wait, the
    first needing one block more than is free."""
    machine = EquivalenceMachine()
    turn = lambda session, prompt, history: dict(session=session, prompt=prompt,
                                                  history=history, new_tokens=1, priority=0)
    machine.admit([turn(0, 36, 0), turn(1, 36, 0), turn(2, 17, 0)])
    for _ in range(14):
        machine.step([False] * R, 1.0)
    machine.admit([turn(0, 39, 37), turn(1, 39, 37), turn(2, 20, 18)])
    return machine


def test_waiting_sessions_can_hold_the_whole_pool():
    machine = stalled_machine()
    assert machine.admitted == ([0, 1, 2], [S.ADMITTED] * 3)
    assert machine.py.cached_tokens[:3] == [36, 36, 17]
    assert machine.py.allocator.num_free_blocks == 0 and not machine.py.running


def test_waiting_sessions_holding_the_pool_make_progress():
    """Later waiting sessions' retained K,V gives way to the first one."""
    machine = stalled_machine()
    for _ in range(30):  # both schedulers agree at every step
        machine.step([False] * R, 1.0)
    status = np.asarray(machine.state.requests.status)
    assert not np.isin(status, admission.ACTIVE).any(), "requests never finished"
    assert np.asarray(machine.state.requests.preemptions).sum() > 0
