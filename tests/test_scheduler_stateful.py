"""The scheduler driven by random arrivals and steps (tight memory, small budgets).

After every rule: no admitted request is lost or duplicated, rejected ones never enter the
table, every reason is the expected one, budgets and limits hold, waiting requests run in policy
order, and the block table's invariants hold. At the end every admitted request finishes.
"""

import dataclasses

import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from block_table_checks import check_structure, snapshot
from symphony_jax.config import CacheConfig, EngineConfig, SchedulerConfig, model_preset
from symphony_jax.scheduler import admission, batch, prefix_cache, step
from symphony_jax.scheduler import state as S
from symphony_jax.scheduler.policy import Policy

BS, BLOCKS = 4, 24
LIMITS = SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=8, max_model_len=40,
                         num_slots=5)
CONFIG = EngineConfig(model_preset("tiny"), CacheConfig(block_size=BS, num_device_blocks=BLOCKS),
                      LIMITS)
N = 3  # requests per admission batch
ACTIVE = (S.WAITING, S.RUNNING, S.PREEMPTED, S.LOADING)

requests = st.lists(st.fixed_dictionaries(dict(
    session=st.sampled_from([S.NO_SESSION, 0, 1, 2, 3]),
    prompt=st.integers(0, 36), history=st.integers(0, 30), new_tokens=st.integers(0, 6),
    priority=st.integers(0, 2))), min_size=0, max_size=N)


class SchedulerMachine(RuleBasedStateMachine):
    policy = Policy(retention="keep")
    limits = LIMITS
    content_width = 0  # of the prefix cache's blocks

    def __init__(self):
        super().__init__()
        self.state = S.init(CONFIG, self.content_width)
        self.now, self.next_id = 0.0, 0
        self.active: dict[int, int] = {}  # request id -> session

    def table(self) -> dict[str, np.ndarray]:
        r = self.state.requests
        return {f.name: np.array(getattr(r, f.name), copy=True)
                for f in r.__dataclass_fields__.values()} | {
            "cached": np.array(self.state.cached_tokens, copy=True)}

    def expected_reasons(self, batch, table) -> list[int]:
        """Admission's rules, one request after another, on the table before the batch."""
        R = LIMITS.slots

        def holder(session):
            held = [h for h in range(R) if table["status"][h] != S.EMPTY and
                    session != S.NO_SESSION and table["session_id"][h] == session]
            return held[0] if held else None

        reasons, reused, seen = [], set(), set()
        for req in batch:
            prompt, history, new, session = (req["prompt"], req["history"], req["new_tokens"],
                                              req["session"])
            if prompt < 1 or new < 1 or history >= prompt:
                reasons.append(S.INVALID)
                continue
            if prompt + new > LIMITS.max_model_len:
                reasons.append(S.TOO_LONG)
                continue
            if -(-(prompt + new) // BS) > BLOCKS - 1:
                reasons.append(S.NO_MEMORY)
                continue
            held = holder(session)
            busy = session != S.NO_SESSION and (
                session in seen or (held is not None and table["status"][held] in ACTIVE))
            reasons.append(S.SESSION_BUSY if busy else S.ADMITTED)
            if not busy and held is not None:
                reused.add(held)
            if session != S.NO_SESSION:
                seen.add(session)
        spare = [h for h in range(R) if table["status"][h] == S.EMPTY] + sorted(
            (h for h in range(R) if table["status"][h] in (S.FINISHED, S.OFFLOADED)
             and h not in reused), key=lambda h: (table["last_used"][h], h))
        for i, req in enumerate(batch):
            if reasons[i] == S.ADMITTED and holder(req["session"]) is None:
                if spare:
                    spare.pop(0)
                else:
                    reasons[i] = S.NO_SLOT
        return reasons

    @rule(batch=requests)
    def admit(self, batch):
        ids = list(range(self.next_id, self.next_id + len(batch)))
        self.next_id += len(batch)
        new = S.new_requests(ids, [r["prompt"] for r in batch], [r["new_tokens"] for r in batch],
                             session_id=[r["session"] for r in batch],
                             history_len=[r["history"] for r in batch],
                             priority=[r["priority"] for r in batch],
                             arrival=[self.now] * len(batch), size=N)
        table = self.table()
        self.state, slots, reasons = admission.admit(
            self.state, new, limits=self.limits, policy=self.policy,
            prompts=self.prompts(batch, ids))
        slots, reasons = np.asarray(slots)[: len(batch)], np.asarray(reasons)[: len(batch)]
        assert reasons.tolist() == self.expected_reasons(batch, table)
        after = self.table()
        for rid, req, slot, reason in zip(ids, batch, slots, reasons):
            if reason == S.ADMITTED:
                assert after["request_id"][slot] == rid and after["status"][slot] == S.WAITING
                self.active[rid] = req["session"]
                self.check_admitted(rid, req, slot, table, after)
            else:
                assert slot == LIMITS.slots and rid not in after["request_id"]

    @rule(stops=st.lists(st.booleans(), min_size=LIMITS.slots, max_size=LIMITS.slots))
    def step(self, stops):
        before = self.table()
        self.state, plan = step.schedule(self.state, self.now, limits=self.limits, policy=self.policy)
        q = np.asarray(plan.query_lens)
        assert q.sum() <= self.limits.max_num_batched_tokens and (q > 0).sum() <= self.limits.max_num_seqs
        assert int(plan.num_tokens) == q.sum() and int(plan.num_seqs) == (q > 0).sum()
        order = np.asarray(plan.order)
        assert sorted(order[: int(plan.num_seqs)].tolist()) == np.flatnonzero(q).tolist()
        self.check_waiting_order(before, q, np.asarray(plan.preempted))
        known = before["prompt_len"] + before["num_generated"]
        samples = np.asarray(plan.samples)
        np.testing.assert_array_equal(samples, (q > 0) & (before["cached"] * (q > 0) + q == known))
        self.state, finished = step.commit(self.state, plan, jnp.asarray(stops), self.now,
                                           policy=self.policy, **self.commit_keys(before))
        finished = np.asarray(finished)
        for slot in np.flatnonzero(finished):
            rid = int(before["request_id"][slot])
            assert rid in self.active, "a request finished twice or was never admitted"
            del self.active[rid]
        self.now += 1.0

    def prompts(self, batch, ids):
        """The arriving prompts as the prefix cache names them (prefix caching only)."""
        return None

    def commit_keys(self, before) -> dict:
        """Every slot's sequence as the prefix cache names it, for commit (prefix caching
        only)."""
        return {}

    def check_admitted(self, request_id: int, request: dict, slot: int, before: dict,
                       after: dict) -> None:
        """What must hold of a request just admitted into ``slot`` (prefix caching only)."""

    def check_waiting_order(self, before, q, preempted):
        waiting = [s for s in range(LIMITS.slots)
                   if before["status"][s] in (S.WAITING, S.PREEMPTED) and not preempted[s]]
        key = lambda s: ((before["priority"][s] if self.policy.order == "priority" else 0),
                         before["arrival"][s], before["request_id"][s])
        ran = [q[s] > 0 for s in sorted(waiting, key=key)]
        assert ran == sorted(ran, reverse=True), "a waiting request ran before an earlier one"

    @invariant()
    def no_request_lost_or_duplicated(self):
        table = self.table()
        active = table["status"] == S.WAITING
        for code in ACTIVE[1:]:
            active |= table["status"] == code
        ids = table["request_id"][active].tolist()
        assert sorted(ids) == sorted(self.active), "active requests differ from those admitted"
        assert (table["cached"][table["status"] == S.EMPTY] == 0).all()
        known = table["prompt_len"] + table["num_generated"]
        assert (table["cached"][active] < known[active] + 1).all()
        check_structure(snapshot(self.state.blocks), BS, self.cache_references())

    def cache_references(self):
        return None

    def teardown(self):
        """Every admitted request finishes: the head of the order always makes progress."""
        for _ in range(400):
            if not self.active:
                break
            self.step([False] * LIMITS.slots)
        assert not self.active, f"requests never finished: {sorted(self.active)}"


class PriorityPrefillFirstDropMachine(SchedulerMachine):
    policy = Policy(order="priority", prefill="prefill_first", chunked_prefill=False,
                    retention="drop")
    limits = dataclasses.replace(LIMITS, max_num_batched_tokens=LIMITS.max_model_len)


class TTLMachine(SchedulerMachine):
    policy = Policy(retention="ttl", ttl_s=3.0)


STEPS = settings(max_examples=10, stateful_step_count=60,
                 suppress_health_check=[HealthCheck.large_base_example, HealthCheck.too_slow])
TestScheduler = SchedulerMachine.TestCase
TestSchedulerPriority = PriorityPrefillFirstDropMachine.TestCase
TestSchedulerTTL = TTLMachine.TestCase
for case in (TestScheduler, TestSchedulerPriority, TestSchedulerTTL):
    case.settings = STEPS


def test_unchunked_prefill_needs_a_budget_for_whole_prompts():
    state = S.init(CONFIG)
    with pytest.raises(ValueError, match="max_num_batched_tokens=8 must be >= max_model_len=40"):
        step.schedule(state, 0.0, limits=LIMITS, policy=Policy(chunked_prefill=False))


def test_abort_frees_the_slot_and_its_blocks():
    state = S.init(CONFIG)
    new = S.new_requests([0, 1], [10, 6], [4, 4], session_id=[5, S.NO_SESSION])
    state, slots, _ = admission.admit(state, new, limits=LIMITS)
    state, _ = step.schedule(state, 0.0, limits=LIMITS, policy=Policy())
    assert int(state.blocks.free_top) < BLOCKS - 1
    state = admission.abort(state, jnp.asarray([slots[0], slots[1], -1]))
    assert (np.asarray(state.requests.status) == S.EMPTY).all()
    assert int(state.blocks.free_top) == BLOCKS - 1
    check_structure(snapshot(state.blocks), BS)


class PrefixCachingMachine(SchedulerMachine):
    """Prompts share prefixes drawn from a few families; finished blocks are cached. Every
    fourth prompt forges its family's keys (a collision, on purpose) over another first block:
    it is never served the family's blocks, nor they its."""

    policy = Policy(retention="keep", prefix_caching=True)
    content_width = 1  # a block's content: one number standing for its tokens

    def __init__(self):
        super().__init__()
        self.named: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # request id -> keys, content

    def name(self, rid: int) -> tuple[np.ndarray, np.ndarray]:
        """A request's sequence as the cache names it: ``u32[MB, K]`` keys, ``i32[MB, 1]``."""
        width = self.state.blocks.max_blocks_per_seq
        family, shared = rid % 3, (rid * 7) % (width + 1)
        keys = np.zeros((width, prefix_cache.KEY_WORDS), np.uint32)
        keys[:, 0] = np.where(np.arange(width) < shared, family + 1, 1000 + rid)
        keys[:, 1] = np.arange(1, width + 1)
        content = (keys[:, :1] * 100 + keys[:, 1:2]).astype(np.int32)
        if rid % 4 == 3:  # a forger: its family's keys over a first block of its own
            content[0] = -1 - rid
        return keys, content

    def prompts(self, batch, ids):
        width = self.state.blocks.max_blocks_per_seq
        keys = np.zeros((N, width, prefix_cache.KEY_WORDS), np.uint32)
        content = np.zeros((N, width, 1), np.int32)
        for i, (rid, req) in enumerate(zip(ids, batch)):
            self.named[rid] = self.name(rid)
            full = max(req["prompt"], 0) // BS
            keys[i, :full], content[i] = self.named[rid][0][:full], self.named[rid][1]
        return prefix_cache.Prefixes(jnp.asarray(keys), jnp.asarray(content),
                                     jnp.full(N, prefix_cache.root_tag(0), jnp.uint32))

    def commit_keys(self, before) -> dict:
        width, R = self.state.blocks.max_blocks_per_seq, self.limits.slots
        keys = np.zeros((R, width, prefix_cache.KEY_WORDS), np.uint32)
        content = np.zeros((R, width, 1), np.int32)
        for slot, rid in enumerate(before["request_id"]):
            if rid in self.named:
                keys[slot], content[slot] = self.named[rid]
        return dict(seq_slots=jnp.arange(R, dtype=jnp.int32), sequences=prefix_cache.Prefixes(
            jnp.asarray(keys), jnp.asarray(content), jnp.full(R, prefix_cache.root_tag(0),
                                                               jnp.uint32)))

    def check_admitted(self, request_id, request, slot, before, after):
        """The cached blocks a prompt starts from were computed for its own leading blocks (a
        session's next request starts from its session's K,V instead)."""
        if request["session"] != S.NO_SESSION and before["session_id"][slot] == request[
                "session"] and before["status"][slot] != S.EMPTY:
            return
        taken = int(after["cached_at_admission"][slot]) // BS
        rows = np.asarray(self.state.blocks.block_ids[0, slot, :taken])
        content = np.asarray(self.state.cache.content)[rows]
        np.testing.assert_array_equal(content, self.named[request_id][1][:taken])

    def cache_references(self):
        cache = self.state.cache
        cached = (np.asarray(cache.block_keys) != 0).any(-1)
        return cached.astype(np.int64)

    @invariant()
    def cache_is_consistent(self):
        """Every entry sits in its key's set and names a referenced block cached under that
        key; every cached block has exactly one entry."""
        cache, NB = self.state.cache, BLOCKS
        keys, blocks = np.asarray(cache.keys), np.asarray(cache.blocks)
        block_keys = np.asarray(cache.block_keys)
        ref_counts = np.asarray(self.state.blocks.ref_counts)
        sets = np.asarray(prefix_cache.set_of(cache.keys, cache.num_sets))
        for where, way in zip(*np.nonzero(blocks < NB)):
            block = blocks[where, way]
            assert (block_keys[block] == keys[where, way]).all() and ref_counts[block] >= 1
            assert sets[where, way] == where
        assert (keys[blocks == NB] == 0).all()
        cached = np.flatnonzero((block_keys != 0).any(-1))
        assert sorted(blocks[blocks < NB].tolist()) == cached.tolist()


TestSchedulerPrefixCaching = PrefixCachingMachine.TestCase
TestSchedulerPrefixCaching.settings = STEPS


def test_a_prompt_starts_from_its_cached_prefix():
    policy = Policy(prefix_caching=True)
    state = S.init(CONFIG)
    width = state.blocks.max_blocks_per_seq

    def sequences(rows, named):
        """Prefixes of ``rows`` sequences, ``named[row]`` the first blocks' keys."""
        keys = np.zeros((rows, width, prefix_cache.KEY_WORDS), np.uint32)
        for row, blocks in named.items():
            keys[row, :len(blocks), :2] = blocks
        return prefix_cache.Prefixes(jnp.asarray(keys), jnp.zeros((rows, width, 0), jnp.int32),
                                     jnp.full(rows, prefix_cache.root_tag(0), jnp.uint32))

    first = S.new_requests([0], [13], [1])  # 3 full blocks of 4, then one token
    blocks = [(7, 1), (7, 2), (7, 3)]
    state, slots, _ = admission.admit(state, first, limits=LIMITS, policy=policy,
                                      prompts=sequences(1, {0: blocks}))
    state, plan = step.schedule(state, 0.0, limits=LIMITS, policy=policy)
    state, plan = step.schedule(step.commit(state, plan, jnp.zeros(LIMITS.slots, bool), 0.0,
                                            policy=policy)[0], 1.0, limits=LIMITS,
                                policy=policy)  # the prompt's second chunk
    state, finished = step.commit(state, plan, jnp.zeros(LIMITS.slots, bool), 1.0,
                                  policy=policy, seq_slots=jnp.arange(LIMITS.slots),
                                  sequences=sequences(LIMITS.slots, {int(slots[0]): blocks}))
    assert bool(finished[slots[0]])
    # A new prompt with the same first two blocks, then its own.
    state, slots2, _ = admission.admit(state, S.new_requests([1], [14], [2]), limits=LIMITS,
                                       policy=policy,
                                       prompts=sequences(1, {0: blocks[:2] + [(9, 9)]}))
    slot = int(slots2[0])
    assert int(state.requests.cached_at_admission[slot]) == 2 * BS
    cached_blocks = prefix_cache.lookup(state.cache, sequences(1, {0: blocks}).keys[0, :2])
    assert np.asarray(state.blocks.block_ids[0, slot, :2]).tolist() == np.asarray(
        cached_blocks).tolist()
    check_structure(snapshot(state.blocks), BS,
                    (np.asarray(state.cache.block_keys) != 0).any(-1).astype(np.int64))


@given(num_seqs=st.integers(1, 64), extra=st.integers(0, 600), decode=st.booleans(),
       max_num_seqs=st.integers(1, 64), budget_extra=st.integers(0, 600))
def test_a_batch_shape_is_the_smallest_bucket_that_holds_the_plan(num_seqs, extra, decode,
                                                                  max_num_seqs, budget_extra):
    limits = SchedulerConfig(max_num_seqs=max_num_seqs,
                             max_num_batched_tokens=max_num_seqs + budget_extra)
    num_seqs = min(num_seqs, max_num_seqs)
    num_tokens = num_seqs if decode else min(num_seqs + extra, limits.max_num_batched_tokens)
    seq_sizes = [n for n in [1 << i for i in range(8)] + [max_num_seqs] if n <= max_num_seqs]
    token_sizes = [n for n in [1 << i for i in range(4, 11)] + [limits.max_num_batched_tokens]
                   if n <= limits.max_num_batched_tokens]
    seqs = min(n for n in seq_sizes if n >= num_seqs)
    tokens = seqs if decode else min(n for n in token_sizes if n >= max(num_tokens, seqs))
    assert batch.shape(num_seqs, num_tokens, decode, limits) == (seqs, tokens)
