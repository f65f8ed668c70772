"""The cluster: systems, SYMPHONY's migration, advisories that go wrong, node removal.

Every system must produce the tokens a single engine produces for the same sessions (greedy):
migration and offload move K,V, they never change it.
"""

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from symphony_jax.cluster import SYSTEMS, Cluster, ClusterConfig, System, run, system
from symphony_jax.cluster import placement
from symphony_jax.cluster.global_scheduler import (ADVICE_KEPT_S, ADVISED_FOR_S,
                                                   GlobalScheduler)
from symphony_jax.cluster.placement import CACHE_SLACK
from symphony_jax.cluster.replay import CompileFreeClock, turn_tokens
from symphony_jax.config import CacheConfig, EngineConfig, SchedulerConfig, model_preset
from symphony_jax.engine.engine import Engine, Residency
from symphony_jax.engine.sampling import SamplingParams
from symphony_jax.model.params import init_params
from symphony_jax.scheduler import state as S
from symphony_jax.workloads import Workload, arrivals
from symphony_jax.workloads.think_time import ThinkTime

CONFIG = EngineConfig(model_preset("tiny"), CacheConfig(block_size=8, num_device_blocks=64),
                      SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64,
                                      max_model_len=256, num_slots=8))
FAST = ThinkTime(reading_wpm=1e9, typing_wpm=1e9)  # no think time


@pytest.fixture(scope="module")
def params():
    yield init_params(CONFIG.model, jax.random.key(0))
    jax.clear_caches()  # this module compiles six systems for several devices: let them go


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True)


def prompt(session: int, turn: int, n: int) -> list[int]:
    """The tokens ``run`` gives a turn of ``n`` new tokens without the workload's ids."""
    w = Workload(session_id=[session] * (turn + 1), input_tokens=[n] * (turn + 1),
                 output_tokens=[1] * (turn + 1))
    return turn_tokens(arrivals.open_loop(dataclasses.replace(w, arrival_s=np.zeros(turn + 1))),
                       turn, CONFIG.model.vocab_size)


def reference(params, turns: list[tuple[int, int, int]]) -> list[list[int]]:
    """One engine, one request at a time: (session, new tokens, output tokens) -> outputs."""
    engine, counts, outputs = Engine(CONFIG, params), {}, []
    for session, n, out in turns:
        turn = counts[session] = counts.get(session, -1) + 1
        rid = engine.add_request(prompt(session, turn, n), greedy(out), session_id=session)
        while engine.has_unfinished():
            engine.step()
        outputs.append(engine.result(rid).token_ids)
    return outputs


def serve(cluster: Cluster, session: int, turn: int, n: int, out: int) -> int:
    rid = cluster.submit(session, prompt(session, turn, n), greedy(out))
    while cluster.has_unfinished():
        cluster.step()
    return rid


def two_nodes(params, name="symphony", **kw) -> Cluster:
    return Cluster(ClusterConfig(CONFIG, num_nodes=2, devices=tuple(jax.devices()[:2])), name,
                   params, **kw)


def resident(cluster: Cluster, node: int, session: int) -> tuple[int, int]:
    """(status, device tokens) of ``session``'s slot on ``node``."""
    engine = cluster.nodes[node].engine
    slot, _ = engine._idle_slot(session)
    r = engine.device.scheduler
    return int(r.requests.status[slot]), int(r.cached_tokens[slot])


def test_every_system_generates_the_same_tokens(params):
    w = Workload(session_id=np.repeat(np.arange(3), 3),
                 input_tokens=[6 + s for s in range(3) for _ in range(3)],
                 output_tokens=np.full(9, 4))
    schedule = arrivals.closed_loop(w, 3, think=FAST, stagger_s=0.0)
    one_device = ClusterConfig(CONFIG, num_nodes=2, devices=(jax.devices()[0],))
    results = {name: run(schedule, name, one_device, params) for name in SYSTEMS}
    rows = results["recompute"].requests.request_id
    want = {int(r): o for r, o in zip(rows, results["recompute"].output_ids)}
    for name, records in results.items():
        got = {int(r): o for r, o in zip(records.requests.request_id, records.output_ids)}
        assert got == want, name
        assert records.requests.finished.all() and len(records.requests) == 9
        assert sorted(records.requests.request_id) == list(range(9))
    # Single engine, turn by turn: the same tokens (rows are sessions' turns in order).
    by_session = reference(params, [(s, 6 + s, 4) for s in range(3) for _ in range(3)])
    assert [list(want[row]) for row in range(9)] == by_session
    # Systems that keep K,V between turns recompute no history; recompute redoes it all.
    later = results["recompute"].requests.turn_index > 0
    assert results["recompute"].requests.recomputed_tokens[later].min() > 0
    for name in ("sticky_offload", "symphony", "oracle"):
        assert results[name].requests.recomputed_tokens.sum() == 0, name


def test_symphony_advisory_moves_kv_to_the_chosen_node_before_the_request(params):
    cluster = two_nodes(params)
    first = cluster.requests[serve(cluster, 0, 0, 20, 6)]
    history = 20 + 6 - 1  # K,V of the prompt and all but the last generated token
    assert resident(cluster, first.node, 0) == (S.FINISHED, history)
    cluster.advise(0)
    for _ in range(6):  # the copy completes and is prefetched; no request is running
        cluster.step()
    (moved,) = cluster.done_migrations
    target = 1 - first.node
    assert (moved.src, moved.dst) == (first.node, target)
    assert resident(cluster, target, 0) == (S.FINISHED, history)  # on the GPU already
    groups = cluster.nodes[target].engine.config.cache.num_layer_groups
    assert cluster.where(0) == (target, Residency((history,) * groups, history))
    assert cluster.nodes[first.node].engine._idle_slot(0) == (None, True)  # source let it go
    second = cluster.requests[serve(cluster, 0, 1, 7, 5)]
    assert second.node == target
    engine_request = cluster.nodes[target].engine.requests[second.engine_id]
    assert engine_request.cached_tokens == history and engine_request.recomputed_tokens == 0
    assert [first.output, second.output] == reference(params, [(0, 20, 6), (0, 7, 5)])
    records = cluster.records()
    block_bytes = CONFIG.model.kv_bytes_per_token() * CONFIG.cache.block_size
    assert records.transfers.bytes.tolist() == [-(-history // 8) * block_bytes]
    assert records.transfers.request_id.tolist() == [second.request_id]
    assert np.isfinite(records.requests.advisory_s[1]) and np.isnan(records.requests.advisory_s[0])


def test_symphony_request_follows_its_kv_in_flight_even_to_a_busier_node(params):
    cluster = two_nodes(params)
    first = cluster.requests[serve(cluster, 0, 0, 20, 6)]
    cluster.advise(0)
    cluster._handle_advisories()  # the copy is dispatched, not yet seen complete
    (moving,) = cluster.migrations
    target = moving.dst
    cluster.scheduler.started(target, 4 * CONFIG.scheduler.max_num_batched_tokens)  # long prompt
    second = cluster.requests[serve(cluster, 0, 1, 7, 5)]
    assert second.node == target != first.node
    r = cluster.nodes[target].engine.requests[second.engine_id]
    assert r.recomputed_tokens == 0 and r.cached_tokens == 20 + 6 - 1
    assert [first.output, second.output] == reference(params, [(0, 20, 6), (0, 7, 5)])


def test_symphony_request_without_advisory_fetches_its_kv_and_loads_it(params):
    cluster = two_nodes(params)
    first = cluster.requests[serve(cluster, 0, 0, 20, 6)]
    second = cluster.requests[serve(cluster, 0, 1, 7, 5)]  # placed by load: the other node
    assert second.node != first.node
    r = cluster.nodes[second.node].engine.requests[second.engine_id]
    assert r.recomputed_tokens == 0 and r.cached_tokens == 25
    assert [first.output, second.output] == reference(params, [(0, 20, 6), (0, 7, 5)])
    transfers = cluster.records().transfers  # the fetch is the second request's
    assert transfers.request_id.tolist() == [second.request_id]
    assert transfers.start_s[0] >= second.arrival_s


def test_false_duplicate_and_unknown_advisories_only_cost_time_or_memory(params):
    cluster = two_nodes(params)
    outputs = [cluster.requests[serve(cluster, 0, 0, 12, 4)].output]
    cluster.advise(0)
    cluster.advise(0)  # duplicated
    cluster.advise(123)  # a session the cluster never saw
    for _ in range(4):
        cluster.step()
    assert len(cluster.done_migrations) == 1
    cluster.advise(0)  # false: no request follows it for a while; K,V is already there
    for _ in range(3):
        cluster.step()
    outputs.append(cluster.requests[serve(cluster, 0, 1, 5, 4)].output)
    outputs.append(cluster.requests[serve(cluster, 123, 0, 5, 4)].output)
    assert outputs == reference(params, [(0, 12, 4), (0, 5, 4), (123, 5, 4)])
    with pytest.raises(ValueError, match="session_id"):
        cluster.advise(-1)
    with pytest.raises(ValueError, match="priority"):
        cluster.advise(0, priority=1.5)


def test_request_behind_its_sessions_running_turn_waits_for_it(params):
    cluster = two_nodes(params)
    a = cluster.submit(0, prompt(0, 0, 10), greedy(6))
    b = cluster.submit(0, prompt(0, 1, 4), greedy(3))  # previous turn still running
    assert cluster.requests[b].node == -1  # queued, not placed
    while cluster.has_unfinished():
        cluster.step()
    ra, rb = cluster.requests[a], cluster.requests[b]
    assert rb.arrival_s <= ra.finish_s <= rb.token_times[0]
    assert [ra.output, rb.output] == reference(params, [(0, 10, 6), (0, 4, 3)])


def test_node_removal_restarts_its_requests_elsewhere_and_loses_its_kv(params):
    cluster = two_nodes(params)
    first = cluster.requests[serve(cluster, 0, 0, 12, 4)]
    a = cluster.submit(1, prompt(1, 0, 9), greedy(8))
    b = cluster.submit(2, prompt(2, 0, 9), greedy(8))
    cluster.step()
    cluster.step()
    gone = first.node
    cluster.remove_node(gone)  # session 0's K,V lived there; a or b was running there
    while cluster.has_unfinished():
        cluster.step()
    second = cluster.requests[serve(cluster, 0, 1, 5, 4)]
    assert second.node == 1 - gone
    r = cluster.nodes[second.node].engine.requests[second.engine_id]
    assert r.recomputed_tokens == 15  # the history was lost with the node: recomputed
    records = cluster.records()
    assert records.requests.finished.all() and len(records.requests) == 4
    assert (records.requests.node != gone).sum() == 3  # every request after the removal moved
    outputs = [cluster.requests[i].output for i in (a, b)]
    assert outputs == reference(params, [(1, 9, 8), (2, 9, 8)])
    assert second.output == reference(params, [(0, 12, 4), (0, 5, 4)])[1]
    with pytest.raises(ValueError, match="last live node"):
        cluster.remove_node(1 - gone)


def test_migration_whose_source_disappears_falls_back_to_recompute(params):
    cluster = two_nodes(params)
    first = cluster.requests[serve(cluster, 0, 0, 12, 4)]
    cluster.advise(0)
    cluster._handle_advisories()  # the copy is dispatched, not yet seen complete
    assert cluster.migrations and cluster.migrations[0].src == first.node
    cluster.remove_node(first.node)
    second = cluster.requests[serve(cluster, 0, 1, 5, 4)]
    r = cluster.nodes[second.node].engine.requests[second.engine_id]
    assert r.recomputed_tokens == 15 and r.cached_tokens == 0
    assert second.output == reference(params, [(0, 12, 4), (0, 5, 4)])[1]


def _served_imbalance(records, num_nodes: int) -> float:
    served = np.bincount(records.requests.node, minlength=num_nodes)
    return float(served.max() / np.median(served))


@pytest.mark.slow
def test_symphony_balances_a_skewed_workload_like_stateless_serving(params):
    """One long chat among short ones: sticky serving piles its turns on one node, per-request
    placement spreads them."""
    turns = np.r_[12, np.ones(7, np.int64)]
    w = Workload(session_id=np.repeat(np.arange(8), turns), input_tokens=np.full(19, 6),
                 output_tokens=np.full(19, 4))
    schedule = arrivals.closed_loop(w, 8, think=FAST, stagger_s=0.0)
    config = ClusterConfig(CONFIG, num_nodes=4, devices=(jax.devices()[0],))
    imbalance = {name: _served_imbalance(run(schedule, name, config, params), 4)
                 for name in ("recompute", "sticky_offload", "symphony")}
    assert imbalance["symphony"] <= 1.5 * imbalance["recompute"]
    assert imbalance["sticky_offload"] >= 2 * imbalance["symphony"], imbalance


def test_placement_policies_are_pure_functions_of_load():
    loads = placement.NodeLoads(np.array([64, 0, 0, 128]), np.array([0, 4, 0, 0]),
                                np.array([True, True, True, False]), 64, 4)
    assert loads.score.tolist() == [1.0, 1.0, 0.0, np.inf]
    assert placement.least_loaded(loads, -1, 0) == 2
    assert placement.sticky(loads, 0, 0) == 0 and placement.sticky(loads, 3, 0) == 2
    assert placement.cache_aware(loads, 0, 0) == 0  # 1 step more work: worth the cache hit
    busy = dataclasses.replace(loads, prefill_tokens=np.array([256, 0, 0, 0]))
    assert placement.cache_aware(busy, 0, 0) == 2
    assert [placement.round_robin(loads, -1, i) for i in range(4)] == [0, 1, 2, 0]


def test_advisories_arriving_together_spread_over_nodes():
    """Each advised request counts in its node's load until it arrives, so simultaneous
    advisories do not all pick the node that was least loaded before them; a false
    advisory's count lapses after ADVISED_FOR_S."""
    scheduler = GlobalScheduler(SYSTEMS["symphony"], 4, step_tokens=64, step_seqs=4)
    scheduler.started(0, 64)  # node 0 busy
    picks = [scheduler.advise(session, now=1.0) for session in range(6)]
    assert sorted(picks) == [1, 1, 2, 2, 3, 3]  # node 0's prefill outweighs two advised each
    assert scheduler.advise(2, now=2.0) == picks[2]  # a repeated advisory keeps its pick
    assert scheduler.place(2, now=3.0) == picks[2]  # the request goes where it was advised
    later = scheduler.loads(now=1.0 + ADVISED_FOR_S)
    assert later.decoding.tolist() == [0, 0, 0, 0]  # the others never came: their counts lapse


def test_an_advised_request_goes_elsewhere_only_if_its_node_became_clearly_busier():
    """The advisory's pick is a forecast: the request keeps it unless, when it arrives, the node
    has more than CACHE_SLACK steps' worth of extra work queued; a K,V still on its way there
    keeps it regardless (elsewhere the request would recompute its history)."""
    def advised_then(queued: int, moving: bool = False) -> int:
        scheduler = GlobalScheduler(SYSTEMS["symphony"], 2, step_tokens=64, step_seqs=4)
        assert scheduler.advise(0, now=1.0) == 0  # equal loads: the first node
        scheduler.started(0, queued)  # a prompt arrives there before the request
        return scheduler.place(0, now=2.0, moving=moving)

    slack = int(64 * CACHE_SLACK)
    assert advised_then(slack) == 0
    assert advised_then(slack + 64) == 1
    assert advised_then(slack + 64, moving=True) == 0


def test_systems_and_configs_reject_bad_input(params):
    with pytest.raises(ValueError, match="unknown system 'vllm': expected one of recompute"):
        system("vllm")
    with pytest.raises(ValueError, match="placement='nearest'"):
        System("x", SYSTEMS["recompute"].policy, "nearest")
    with pytest.raises(ValueError, match="host tier"):
        System("x", SYSTEMS["recompute"].policy, "least_loaded", hints="migrate")
    with pytest.raises(ValueError, match="disk tier needs a policy with a host tier"):
        System("x", SYSTEMS["recompute"].policy, "least_loaded", disk_tier=True)
    with pytest.raises(ValueError, match=r"layer_groups=0: expected an integer >= 1"):
        System("x", SYSTEMS["recompute"].policy, "least_loaded", layer_groups=0)
    with pytest.raises(ValueError, match="num_nodes"):
        ClusterConfig(CONFIG, num_nodes=0)
    cluster = two_nodes(params, "recompute")
    with pytest.raises(ValueError, match="new_tokens"):
        cluster.submit(0, [999])
    with pytest.raises(ValueError, match="where: session_id=-1"):
        cluster.where(-1)
    with pytest.raises(ValueError, match="run: schedule"):
        run("not a schedule", "recompute", ClusterConfig(CONFIG), params)


def test_the_compile_free_clock_leaves_out_compilation_while_in_use():
    """A function compiled while the clock is in use (a ``with`` block) does not advance it;
    one compiled afterwards is not counted."""
    def chain(x):
        for _ in range(40):
            x = jnp.tanh(x @ x)
        return x

    x = jnp.ones((8, 8))
    with CompileFreeClock() as clock:
        wall, start = time.monotonic(), clock()
        jax.jit(chain)(x).block_until_ready()
        wall, elapsed = time.monotonic() - wall, clock() - start
    assert clock.compiles == 1 and 0 < clock.seconds < wall
    assert elapsed == pytest.approx(wall - clock.seconds, abs=0.01)
    excluded = clock.seconds
    jax.jit(lambda y: chain(y) + 1)(x).block_until_ready()
    assert (clock.compiles, clock.seconds) == (1, excluded)


def test_remove_node_checks_its_index_and_is_idempotent(params):
    cluster = Cluster(ClusterConfig(CONFIG, num_nodes=3, devices=tuple(jax.devices()[:3])),
                      "recompute", params)
    rids = [cluster.submit(s, prompt(s, 0, 9), greedy(6)) for s in range(3)]
    cluster.step()
    for bad in (-1, 3, True, 1.0, "1"):
        with pytest.raises(ValueError, match=r"remove_node\(.*\): expected a node index in "
                                             r"\[0, 3\)"):
            cluster.remove_node(bad)
    assert [n.alive for n in cluster.nodes] == [True] * 3
    assert cluster.remove_node(2) is True and cluster.remove_node(2) is False
    with pytest.raises(ValueError, match="expected a node index"):
        GlobalScheduler(SYSTEMS["symphony"], 2, step_tokens=64, step_seqs=4).remove(-1)
    while cluster.has_unfinished():
        cluster.step()
    assert [cluster.requests[r].output for r in rids] == reference(
        params, [(s, 9, 6) for s in range(3)])


def test_advisories_never_followed_expire_and_a_flood_costs_linear_time():
    scheduler = GlobalScheduler(SYSTEMS["symphony"], 4, step_tokens=64, step_seqs=4)
    start = time.perf_counter()
    for session in range(20_000):  # quadratic handling takes minutes here
        scheduler.note_advisory(session, now=1.0)
        scheduler.advise(session, now=1.0)
    assert time.perf_counter() - start < 10.0
    assert scheduler.loads(now=2.0).decoding.sum() == 20_000
    assert scheduler.advisory_time(7, now=2.0) == 1.0  # its request came: when it was advised
    scheduler.note_advisory(20_001, now=30.0)
    later = scheduler.loads(now=1.0 + ADVISED_FOR_S)  # the flood's requests never came
    assert later.decoding.sum() == 0 and not scheduler.counted
    pick = scheduler.advised[9][0]  # no longer counted, still kept: its request goes there
    assert scheduler.place(9, now=2.0 + ADVISED_FOR_S) == pick
    scheduler.loads(now=1.0 + ADVICE_KEPT_S)
    assert not scheduler.advised and list(scheduler.advised_at) == [20_001]  # bounded memory
    assert np.isnan(scheduler.advisory_time(8, now=1.0 + ADVICE_KEPT_S))


def test_a_seeded_cluster_run_with_migrations_is_reproducible(params):
    """With copies and migrations seen complete at the next step and a clock that ticks per
    reading, the same run twice records the same, byte for byte."""
    import itertools
    import pickle

    def once() -> bytes:
        ticks = itertools.count()
        cluster = two_nodes(params, clock=lambda: next(ticks) * 1e-3,
                            copy_completion="next_step")
        for turn in range(3):
            for session in range(3):
                cluster.advise(session)
                cluster.step()
                cluster.submit(session, prompt(session, turn, 5 + session), greedy(4))
            while cluster.has_unfinished():
                cluster.step()
        assert cluster.done_migrations, "advisories moved K,V"
        return pickle.dumps(cluster.records())

    assert once() == once()
