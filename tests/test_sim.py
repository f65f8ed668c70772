"""The simulator: links, determinism, conservation, hand-computed latency, memory bounds, and the
same batching decisions as the real engine."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from symphony_jax.cluster.systems import SYSTEMS
from symphony_jax.config import CacheConfig, EngineConfig, SchedulerConfig, model_preset
from symphony_jax.scheduler import state as S
from symphony_jax.sim import node as node_module
from symphony_jax.sim.network import Network
from symphony_jax.sim.simulator import SimConfig, Simulator, reaction_s, simulate
from symphony_jax.workloads import (AdvisoryConfig, ShareGPTLike, ThinkTime, Workload,
                                    closed_loop, open_loop, sharegpt_like)

CONFIG = EngineConfig(model_preset("tiny"), CacheConfig(block_size=16, num_device_blocks=49),
                      SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=128,
                                      max_model_len=512, num_slots=16))
CHAT = ShareGPTLike(mean_input_tokens=24, mean_output_tokens=16, max_context_tokens=448)
THINK = ThinkTime(reading_wpm=7_200, typing_wpm=5_400)


@dataclasses.dataclass(frozen=True)
class Linear:
    """A cost model simple enough to add up by hand: fixed time per step and per token."""

    per_step: float = 1e-3
    per_token: float = 1e-5
    admission_s: float = 0.0
    report_s: float = 0.0

    def step_time(self, query_lens, context_lens):
        return self.per_step + self.per_token * jnp.sum(query_lens).astype(jnp.float32)

    def run_times(self, query_lens, context_lens, steps):
        return jnp.full(steps, self.step_time(query_lens, context_lens))


def chat(sessions=8, users=4, seed=0, advisories=AdvisoryConfig()):
    return closed_loop(sharegpt_like(sessions, CHAT, seed=seed), users, think=THINK,
                       advisories=advisories, stagger_s=0.05, seed=seed)


# ------------------------------------------------------------------ links

def test_two_flows_share_a_link_and_each_runs_at_half_rate():
    net, done = Network({"a": 100.0, "b": 50.0}), {}
    net.start(("a",), 100.0, 0.0, lambda t: done.setdefault("first", t))
    net.start(("a",), 100.0, 0.0, lambda t: done.setdefault("second", t))
    net.advance(10.0)
    assert done == pytest.approx({"first": 2.0, "second": 2.0})  # 50 B/s each
    # One flow alone, then a second joins halfway: 50 B alone (0.5 s), then 50 B at half rate.
    net.start(("a",), 100.0, 10.0, lambda t: done.setdefault("third", t))
    net.start(("a", "b"), 10.0, 10.5, lambda t: done.setdefault("fourth", t))
    net.advance(20.0)
    assert done["fourth"] == pytest.approx(10.7)  # min(100/2, 50/1) = 50 B/s
    assert done["third"] == pytest.approx(10.5 + 10 / 50 + 40 / 100)
    assert net.moved["a"] == pytest.approx(310.0)


def test_next_completion_near_links_counts_the_flows_that_can_change_theirs():
    net = Network({"pcie0": 10.0, "nic0": 10.0, "nic1": 10.0, "nic2": 10.0, "pcie1": 1.0})
    net.start(("pcie1",), 0.5, 0.0, lambda t: None)  # ends at 0.5, crosses no link of node 0
    net.start(("nic1", "nic2"), 5.0, 0.0, lambda t: None)  # 5 B/s, ends at 1.0; shares nic1
    net.start(("nic0", "nic1"), 20.0, 0.0, lambda t: None)  # with node 0's flow (5 B/s)
    assert net.next_completion() == pytest.approx(0.5)
    assert net.next_completion(("pcie0", "nic0")) == pytest.approx(1.0)  # through nic1
    assert net.next_completion(("pcie1",)) == pytest.approx(0.5)
    net.advance(1.5)  # node 0's flow alone from 1.0: 15 B left then, at 10 B/s
    assert net.next_completion(("pcie0", "nic0")) == pytest.approx(2.5)
    assert net.next_completion(("pcie1",)) == math.inf


def test_a_flow_moves_nothing_and_takes_no_bandwidth_during_its_latency():
    net, done = Network({"a": 100.0}), {}
    net.start(("a",), 100.0, 0.0, lambda t: done.setdefault("first", t))
    net.start(("a",), 100.0, 0.0, lambda t: done.setdefault("late", t), latency=0.5)
    net.start(("a",), 0.0, 0.0, lambda t: done.setdefault("empty", t), latency=0.25)
    assert net.next_completion() == pytest.approx(0.25)  # the empty flow: latency alone
    net.advance(10.0)
    # 50 B alone by 0.5 s, then 50 B/s each: the first ends at 1.5 s, the late one (50 B moved
    # by then) alone again at 100 B/s.
    assert done == pytest.approx({"empty": 0.25, "first": 1.5, "late": 2.0})
    assert net.moved["a"] == pytest.approx(200.0)
    with pytest.raises(ValueError, match="latency"):
        net.start(("a",), 1.0, 10.0, lambda t: None, latency=-1.0)


def test_network_rejects_bad_links_and_backwards_time():
    with pytest.raises(ValueError, match="'x' bandwidth"):
        Network({"x": 0.0})
    net = Network({"a": 1.0})
    with pytest.raises(ValueError, match="path"):
        net.start(("b",), 1.0, 0.0, lambda t: None)
    net.advance(5.0)
    with pytest.raises(ValueError, match="time runs forward"):
        net.advance(1.0)


# ------------------------------------------------------------------ one request by hand

@pytest.mark.parametrize("host", [(0.0, 0.0), (3e-4, 2e-4)])
def test_a_single_request_takes_the_cost_models_sum(host):
    """One 40-token prompt, 5 output tokens, chunks of 16 tokens: its admission, 3 prefill
    steps (16, 16, 8 tokens; the last samples the first token), 4 decode steps; its tokens
    reported ``report_s`` after their step."""
    config = dataclasses.replace(CONFIG, scheduler=dataclasses.replace(
        CONFIG.scheduler, max_num_batched_tokens=16))
    w = Workload(session_id=[0], input_tokens=[40], output_tokens=[5], arrival_s=[0.25])
    cost = Linear(admission_s=host[0], report_s=host[1])
    records = simulate(open_loop(w), "recompute", SimConfig(config, 1), cost)
    r = records.requests
    prefill = 3 * cost.per_step + 40 * cost.per_token
    decode = 4 * (cost.per_step + cost.per_token)
    start = 0.25 + cost.admission_s
    assert r.first_token_s[0] == pytest.approx(start + prefill + cost.report_s, rel=1e-5)
    assert r.finish_s[0] == pytest.approx(start + prefill + decode + cost.report_s, rel=1e-5)
    assert (r.prefill_tokens[0], r.output_tokens[0], r.node[0]) == (40, 5, 0)


# ------------------------------------------------------------------ runs

@pytest.mark.parametrize("name", ["recompute", "symphony"])
def test_deterministic_and_conserving(name):
    schedule = chat(advisories=AdvisoryConfig(drop_fraction=0.5))  # some requests fetch
    config = SimConfig(CONFIG, num_nodes=2)
    first = simulate(schedule, name, config, Linear())
    again = simulate(schedule, name, config, Linear())
    for a, b in zip(dataclasses.astuple(first.requests), dataclasses.astuple(again.requests)):
        np.testing.assert_array_equal(a, b)
    r, w = first.requests, schedule.workload
    # Every request finished exactly once, with its workload's output length.
    np.testing.assert_array_equal(np.sort(r.request_id), np.arange(schedule.num_rows))
    assert np.isfinite(r.finish_s).all()
    np.testing.assert_array_equal(r.output_tokens, w.output_tokens[r.request_id])
    assert (r.first_token_s >= r.arrival_s).all() and (r.finish_s >= r.first_token_s).all()
    # A turn's prompt is its session's history plus its input.
    order = np.lexsort((w.turn_index, w.session_id))
    context = np.zeros(schedule.num_rows, np.int64)
    for row in order:
        prev = order[np.flatnonzero(order == row)[0] - 1]
        continues = w.turn_index[row] > 0
        context[row] = (context[prev] + w.input_tokens[prev] + w.output_tokens[prev]
                        if continues else 0)
    np.testing.assert_array_equal(r.input_tokens, context[r.request_id] + w.input_tokens[
        r.request_id])
    # Memory never exceeds a node's pool; migrated bytes are whole blocks of the sessions.
    block_bytes = CONFIG.model.kv_bytes_per_token() * CONFIG.cache.block_size
    assert first.steps.device_bytes.max() <= (CONFIG.cache.num_device_blocks - 1) * block_bytes
    m = first.transfers
    assert (m.bytes % block_bytes == 0).all() and (m.end_s >= m.start_s).all()
    if name == "recompute":
        assert len(m) == 0 and r.recomputed_tokens.sum() > 0
    else:
        assert len(m) > 0
        # A transfer prepares a request of its session, started after the session's previous
        # turn ended and ended before the request's first token.
        row = {int(i): k for k, i in enumerate(r.request_id)}
        turn = {(int(s), int(t)): k for k, (s, t) in enumerate(zip(r.session_id, r.turn_index))}
        for session, request, start, end in zip(m.session_id, m.request_id, m.start_s, m.end_s):
            k = row[int(request)]
            before = turn.get((int(session), int(r.turn_index[k]) - 1))
            assert r.session_id[k] == session and end <= r.first_token_s[k]
            assert before is None or start >= r.finish_s[before]
        assert r.recomputed_tokens.sum() < simulate(schedule, "recompute", config,
                                                    Linear()).requests.recomputed_tokens.sum()


def test_a_migration_takes_its_latency_then_its_bytes_time():
    schedule = chat(advisories=AdvisoryConfig(drop_fraction=0.5))
    for bandwidth in (math.inf, 1e6):  # B/s of each network interface
        config = SimConfig(CONFIG, num_nodes=2, nic_bandwidth=bandwidth,
                           migration_latency_s=0.02)
        m = simulate(schedule, "symphony", config, Linear()).transfers
        assert len(m) > 0
        alone = 0.02 + m.bytes / bandwidth  # each one's time without others on its links
        if bandwidth == math.inf:
            np.testing.assert_allclose(m.end_s - m.start_s, alone, rtol=1e-9)
        else:
            assert (m.end_s - m.start_s >= alone * (1 - 1e-9)).all()


@pytest.mark.parametrize("name", ["recompute", "sticky_offload", "symphony"])
def test_long_runs_decide_as_stepping_one_at_a_time(name, monkeypatch):
    """Nodes run many steps per call, steady decode steps many at once, and nodes whose next
    steps only decode are parked (events elsewhere pass them by); the requests' nodes, counts
    and times are those of one step per call, every node stopping at every event (times to
    float32 rounding), and the host tier's prefetches and admissions happen at the same
    steps."""
    schedule, config = chat(sessions=12, users=6), SimConfig(CONFIG, num_nodes=2)
    passed = []  # per run: over its events, the nodes with steps to run they passed by
    handle = Simulator._handle

    def spy(self, t):
        passed[-1] += sum(n.busy and not n.idle and not n.waiting_on and n.clock < t
                          for n in self.nodes)
        handle(self, t)

    monkeypatch.setattr(Simulator, "_handle", spy)
    runs = []
    for stretch, decode_run in ((1, 1), (node_module.STRETCH_STEPS, node_module.DECODE_RUN)):
        sim = Simulator(schedule, name, config, Linear())
        for node in sim.nodes:
            node.stretch_steps, node.decode_run = stretch, decode_run
        passed.append(0)
        runs.append((sim.run(), sum(n.steps for n in sim.nodes),
                     sum(n.rounds for n in sim.nodes)))
    (one, steps, rounds), (fast, fast_steps, fast_rounds) = runs
    assert fast_steps == steps == rounds and fast_rounds < steps / 2
    assert passed[0] == 0 and passed[1] > 0
    a, b = one.requests, fast.requests
    for field in ("request_id", "node", "output_tokens", "prefill_tokens", "recomputed_tokens"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    for field in ("arrival_s", "first_token_s", "finish_s"):
        np.testing.assert_allclose(getattr(a, field), getattr(b, field), rtol=1e-5)
    if name == "symphony":
        assert len(fast.transfers) > 0


def test_reaction_time_of_a_closed_loop_is_its_least_think_time():
    schedule = chat()
    events = schedule.after_finish(np.arange(schedule.num_rows), np.zeros(schedule.num_rows))
    assert reaction_s(schedule) == pytest.approx(events.time_s.min()) and reaction_s(schedule) > 0
    w = Workload(session_id=[0], input_tokens=[4], output_tokens=[2], arrival_s=[0.0])
    assert reaction_s(open_loop(w)) == math.inf


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="num_nodes"):
        SimConfig(CONFIG, num_nodes=0)
    with pytest.raises(ValueError, match="nic_bandwidth"):
        SimConfig(CONFIG, nic_bandwidth=-1.0)
    with pytest.raises(ValueError, match="disk_bandwidth"):
        SimConfig(CONFIG, disk_bandwidth=0.0)
    for field in ("disk_bytes", "migration_latency_s"):
        for bad in (-1.0, True, "1 TB", math.inf):
            with pytest.raises(ValueError, match=field):
                SimConfig(CONFIG, **{field: bad})
    with pytest.raises(ValueError, match="engine"):
        SimConfig("tiny")
    with pytest.raises(ValueError, match="schedule"):
        simulate("trace.csv", "recompute", SimConfig(CONFIG), Linear())
    with pytest.raises(ValueError, match="cost"):
        simulate(chat(), "recompute", SimConfig(CONFIG), 1e-3)
    with pytest.raises(ValueError, match="unknown system"):
        simulate(chat(), "vllm", SimConfig(CONFIG), Linear())


# ------------------------------------------------------------------ against the real engine

def test_same_batching_decisions_as_the_real_engine():
    """Twelve requests at once on a pool that cannot hold them all (chunked prefill,
    preemption by recompute): the engine's plans, step by step, are the simulated node's."""
    from symphony_jax.engine.engine import Engine
    from symphony_jax.engine.sampling import SamplingParams
    from symphony_jax.model.params import init_params

    config = dataclasses.replace(CONFIG, cache=dataclasses.replace(CONFIG.cache,
                                                                   num_device_blocks=17))
    rng = np.random.default_rng(0)
    prompts = rng.integers(1, 60, 12)
    outputs = rng.integers(2, 30, 12)
    engine = Engine(config, init_params(config.model, jax.random.key(0)), admit_batch=16,
                    record_steps=True)
    for i, (p, o) in enumerate(zip(prompts, outputs)):
        engine.add_request(list(range(1, p + 1)), SamplingParams(max_tokens=int(o),
                                                                 ignore_eos=True),
                           session_id=i)
    while engine.has_unfinished():
        engine.step()
    log = engine.step_log
    engine_plans = [(s.query_lens, s.context_lens) for s in log if s.query_lens.any()]
    # The log also says what a cost model's host terms are fitted to: all twelve taken in
    # before the first step, and each step's outputs read after the next one was scheduled.
    assert [s.admitted for s in log] == [12] + [0] * (len(log) - 1)
    assert all(a.time_s <= b.time_s <= a.reported_s for a, b in zip(log, log[1:])
               if a.query_lens.any())

    from symphony_jax.scheduler.policy import Policy
    from symphony_jax.sim.node import SimNode, SimRequest

    node = SimNode(0, config, Policy(), Linear(), lambda *a: None)
    for i, (p, o) in enumerate(zip(prompts, outputs)):
        node.submit(SimRequest(i, i, 0, int(p), 0, int(o), 0.0))
    assert node.admit() == []
    sim_plans = []
    while node.requests:
        out = node.run(math.inf, max_steps=1)
        sim_plans.append((out.query_lens, out.cached_before))
        node.finished(out)
    assert len(sim_plans) == len(engine_plans) > len(prompts)
    for step, ((q, context), (sim_q, cached_before)) in enumerate(zip(engine_plans, sim_plans)):
        np.testing.assert_array_equal(q, sim_q, err_msg=f"step {step}")
        np.testing.assert_array_equal(context[q > 0], cached_before[sim_q > 0],
                                      err_msg=f"step {step}")
    assert int(jax.device_get(node.state.requests.preemptions).sum()) > 0
    assert (np.asarray(jax.device_get(node.state.requests.status)) != S.RUNNING).all()


def test_a_purged_upper_layer_group_is_all_a_simulated_restore_moves():
    """As in the engine (``test_host_engine``): with two layer groups, another session needing
    room takes only the upper group of session 7, whose host copy is current, and session 7's
    next turn copies back only that group's layers: half of its blocks' bytes."""
    from symphony_jax.scheduler.policy import Policy
    from symphony_jax.sim.node import SimNode, SimRequest

    config = dataclasses.replace(CONFIG, cache=dataclasses.replace(
        CONFIG.cache, block_size=8, num_device_blocks=25, num_host_blocks=64,
        num_layer_groups=2))
    flows = []
    node = SimNode(0, config, Policy(retention="host", layerwise_loading=True), Linear(),
                   lambda t, path, nbytes, done: flows.append((nbytes, done)))

    def serve(request: SimRequest) -> None:
        node.submit(request)
        assert node.admit() == []
        while node.requests:
            node.finished(node.run(math.inf, max_steps=1))
            while flows:  # copies complete at once
                flows.pop(0)[1](node.clock)

    def tokens_of(session: int) -> list[int]:
        (slot,) = np.flatnonzero(node.slot_session == session)
        return np.asarray(jax.device_get(node.state.blocks.num_tokens[:, slot])).tolist()

    serve(SimRequest(0, 7, 0, 20, 0, 8, 0.0))
    history = 20 + 8 - 1  # the last sampled token's K,V is never computed
    assert tokens_of(7) == [history, history] and history in node.stored.tolist()
    serve(SimRequest(1, 100, 0, 60, 0, 8, node.clock))
    assert tokens_of(7) == [history, 0]  # the upper group went; the lower one stayed
    restores = []
    node.launch = lambda t, path, nbytes, done: (restores.append(nbytes),
                                                  flows.append((nbytes, done)))
    serve(SimRequest(2, 7, 1, history + 1 + 6, history + 1, 8, node.clock))
    half = node.block_bytes // 2
    assert restores[0] == -(-history // 8) * half
    assert node.requests == {} and tokens_of(7)[0] == tokens_of(7)[1] > history


def test_a_turns_full_blocks_are_on_the_host_while_its_write_back_is_in_flight():
    """As in the engine, which writes each block back as it fills: a session purged right after
    its turn, before the copy of the turn's K,V is done, keeps its full blocks on the host, and
    its next turn restores them and recomputes only the partial last block."""
    from symphony_jax.scheduler.policy import Policy
    from symphony_jax.sim.node import SimNode, SimRequest

    config = dataclasses.replace(CONFIG, cache=dataclasses.replace(
        CONFIG.cache, block_size=8, num_device_blocks=17, num_host_blocks=64))
    flows = []
    node = SimNode(0, config, Policy(retention="host"), Linear(),
                   lambda t, path, nbytes, done: flows.append(done))

    def serve(request: SimRequest, copies_done: bool = False) -> SimRequest:
        node.submit(request)
        assert node.admit() == []
        while node.requests:
            node.finished(node.run(math.inf, max_steps=1))
            while copies_done and flows:
                flows.pop(0)(node.clock)
        return request

    serve(SimRequest(0, 7, 0, 20, 0, 8, 0.0))
    history = 20 + 8 - 1  # 3 full blocks and 3 tokens
    (slot,) = np.flatnonzero(node.slot_session == 7)
    assert len(flows) == 1 and int(node.state.requests.host_tokens[slot]) == 24
    serve(SimRequest(1, 100, 0, 100, 0, 8, node.clock))  # takes every block: 7's go
    assert int(node.state.blocks.num_tokens[0, slot]) == 0
    assert int(node.state.requests.status[slot]) == S.FINISHED  # not EMPTY: the host holds 24
    again = serve(SimRequest(2, 7, 1, history + 1 + 6, history + 1, 8, node.clock),
                  copies_done=True)
    assert again.recomputed_tokens == history - 24


def test_k_v_the_host_tier_evicts_comes_back_from_the_disk_tier_not_recomputed():
    """One node whose host tier holds one of two sessions: session 1's turn evicts session 0's
    K,V from the host (and the device), which spills it to the disk tier; session 0's next turn
    reads it back (sharing the disk with session 1's entry, spilled as session 0's comes in)
    and recomputes nothing. Without a disk tier it recomputes its whole history."""
    config = EngineConfig(model_preset("tiny"),
                          CacheConfig(block_size=8, num_device_blocks=17, num_host_blocks=16),
                          SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=128,
                                          max_model_len=128, num_slots=16))
    w = Workload(session_id=[0, 0, 1], input_tokens=[20, 6, 100], output_tokens=[8, 8, 8],
                 arrival_s=[0.0, 2.0, 1.0])
    system = dataclasses.replace(SYSTEMS["sticky_offload"], name="sticky_disk", disk_tier=True)
    cost, bandwidth = Linear(), 1e5
    runs = {disk: simulate(open_loop(w), system, SimConfig(config, 1, disk_bytes=disk,
                                                           disk_bandwidth=bandwidth),
                           cost).requests for disk in (0.0, 1e6)}
    history = 20 + 8 - 1
    assert runs[0.0].recomputed_tokens[1] == history
    r = runs[1e6]
    assert r.recomputed_tokens.tolist() == [0, 0, 0] and r.prefill_tokens[1] == 6 + 1
    read = -(-history // 8) * 8 * config.model.kv_bytes_per_token()  # 4 blocks
    step = cost.per_step + 7 * cost.per_token
    assert r.first_token_s[1] == pytest.approx(2.0 + read / (bandwidth / 2) + step, rel=1e-5)
    # An entry larger than the disk tier is not saved: the history is recomputed.
    small = simulate(open_loop(w), system, SimConfig(config, 1, disk_bytes=read - 1,
                                                     disk_bandwidth=bandwidth), cost).requests
    assert small.recomputed_tokens[1] == history
