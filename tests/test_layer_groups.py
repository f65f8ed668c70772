"""SYMPHONY's layer-granular K,V management in the scheduler: a purge takes the upper-most
resident layer group of the least recently used idle session, a session missing upper groups
restores only those, and a fill gives free blocks to every session's lower groups before
anyone's upper ones. (The engine and the simulator run these transitions: ``test_host_engine``
and ``test_sim`` check their copies.)"""

import dataclasses

import jax.numpy as jnp
import numpy as np

from block_table_checks import check_structure, snapshot
from symphony_jax.config import CacheConfig, EngineConfig, SchedulerConfig, model_preset
from symphony_jax.memory import block_table as bt
from symphony_jax.scheduler import admission, step, tiers
from symphony_jax.scheduler import state as S
from symphony_jax.scheduler.batch import padded
from symphony_jax.scheduler.policy import Policy

BS, G, R = 4, 3, 6
CONFIG = EngineConfig(dataclasses.replace(model_preset("tiny"), num_layers=G),
                      CacheConfig(block_size=BS, num_device_blocks=1 + 30, num_layer_groups=G),
                      SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64,
                                      max_model_len=64, num_slots=R))
LIMITS = CONFIG.scheduler
POLICY = Policy(retention="host", layerwise_loading=True)


def pad(values, fill):
    return jnp.asarray(padded(list(values), R, fill))


def tokens(state, slot) -> list[int]:
    return np.asarray(state.blocks.num_tokens[:, slot]).tolist()


def admit(state, request_id: int, session: int, prompt: int, now: float, history: int = 0):
    state, slots, reasons = admission.admit(
        state, S.new_requests([request_id], [prompt], [1], session_id=[session],
                              history_len=[history], arrival=[now], size=4),
        limits=LIMITS, policy=POLICY)
    assert int(reasons[0]) == S.ADMITTED
    return state, int(slots[0])


def run_step(state, now: float):
    """One step: every request there has one token to generate, so each scheduled one ends."""
    state, plan = step.schedule(state, now, limits=LIMITS, policy=POLICY)
    state, _ = step.commit(state, plan, jnp.zeros(R, bool), now, policy=POLICY)
    return state, plan


def serve(state, request_id: int, session: int, prompt: int, now: float):
    """Run a one-token request of ``session`` to its end: an idle session, its K,V kept."""
    state, slot = admit(state, request_id, session, prompt, now)
    state, _ = run_step(state, now)
    assert int(state.requests.status[slot]) == S.FINISHED
    return state, slot


def test_a_purge_takes_the_upper_most_groups_of_the_least_recently_used_idle_session():
    state = S.init(CONFIG)
    state, bare = serve(state, 0, session=3, prompt=8, now=0.0)  # 2 blocks in each group
    state, old = serve(state, 1, session=1, prompt=12, now=1.0)  # 3 blocks in each group
    state, new = serve(state, 2, session=2, prompt=12, now=2.0)
    state = tiers.stored(state, pad([old, new], R), pad([12, 12], 0))  # not session 3
    assert int(state.blocks.free_top) == 30 - 6 - 9 - 9
    # 16 tokens need 12 blocks: the oldest session has no host copy and gives all it has.
    state, _ = admit(state, 3, session=4, prompt=16, now=3.0)
    state, plan = run_step(state, 3.0)
    assert tokens(state, bare) == [0, 0, 0] and int(state.requests.status[bare]) == S.EMPTY
    assert tokens(state, old) == tokens(state, new) == [12, 12, 12]
    # 8 tokens need 6 blocks: the oldest session now has its K,V on the host, and gives its
    # upper groups, one at a time, until they fit: two of them.
    state, _ = admit(state, 4, session=5, prompt=8, now=4.0)
    state, plan = run_step(state, 4.0)
    assert tokens(state, old) == [12, 0, 0] and tokens(state, new) == [12, 12, 12]
    assert int(state.requests.status[old]) == S.FINISHED and bool(plan.evicted[old])
    assert int(state.blocks.free_top) == 0
    check_structure(snapshot(state.blocks), BS)


def test_a_session_missing_its_upper_groups_restores_only_those():
    state = S.init(CONFIG)
    state, slot = serve(state, 0, session=1, prompt=12, now=0.0)
    state = tiers.stored(state, pad([slot], R), pad([12], 0))
    state = dataclasses.replace(state, blocks=bt.free(state.blocks, [slot],
                                                      np.array([False, True, True])))
    free = int(state.blocks.free_top)
    state, _ = admit(state, 1, session=1, prompt=15, now=1.0, history=12)
    state, plan = step.schedule(state, 1.0, limits=LIMITS, policy=POLICY)
    assert bool(plan.restores[slot]) and int(plan.restore_groups[slot]) == 2
    assert int(plan.query_lens[slot]) == 3  # the history is not computed again
    # The 3 new tokens in every group (a fourth block each), the host's 12 in the two missing.
    assert tokens(state, slot) == [15, 15, 15] and free - int(state.blocks.free_top) == 1 + 2 * 4
    check_structure(snapshot(state.blocks), BS)


def test_a_fill_gives_every_session_its_lower_groups_before_anyones_upper_ones():
    state = S.init(CONFIG)
    a, b = 0, 1
    state = tiers.adopt(state, pad([a, b], R), pad([1, 2], S.NO_SESSION), 0.0)
    state = tiers.stored(state, pad([a, b], R), pad([12, 12], 0))  # 3 blocks per group each
    table, _ = bt.reserve(state.blocks, [4], [24])  # 6 blocks in each group
    table, _ = bt.reserve(table, [5], [8], np.array([True, False, False]))  # and 2
    assert int(table.free_top) == 10  # both sessions' group 0, then a's group 1
    state, given = tiers.prefetch(dataclasses.replace(state, blocks=table), pad([a, b], R))
    assert np.asarray(given)[:, :2].tolist() == [[True, True], [True, False], [False, False]]
    assert tokens(state, a) == [12, 12, 0] and tokens(state, b) == [12, 0, 0]
    assert [int(state.requests.status[s]) for s in (a, b)] == [S.PREFETCHING] * 2
    assert int(state.blocks.free_top) == 1


def test_a_swapped_waiting_session_the_host_holds_is_restorable_at_once():
    """Preempted by swap, a sequence whose K,V the host tier holds already has nothing to copy:
    it waits restorable (no offload that no copy would ever complete), and runs from the host
    once blocks are free."""
    swap = dataclasses.replace(POLICY, preemption="swap")
    run = lambda state, now: step.schedule(state, now, limits=LIMITS, policy=swap)
    state = S.init(CONFIG)
    state, slot = serve(state, 0, session=1, prompt=12, now=0.0)  # 3 blocks in each group
    state = tiers.stored(state, pad([slot], R), pad([12], 0))
    state, first = admit(state, 1, session=2, prompt=32, now=1.0)  # 8 blocks a group: 24 of 21
    state, _ = admit(state, 2, session=1, prompt=15, now=2.0, history=12)
    state, plan = run(state, 2.0)  # the earlier request takes the waiting session's blocks
    assert int(plan.query_lens[first]) == 32 and tokens(state, slot) == [0, 0, 0]
    assert int(state.requests.status[slot]) == S.PREEMPTED and not bool(plan.offloads[slot])
    state, _ = step.commit(state, plan, jnp.zeros(R, bool), 2.0, policy=swap)
    state, plan = run(state, 3.0)  # the finished request's K,V gives way
    assert bool(plan.restores[slot]) and int(plan.query_lens[slot]) == 3
