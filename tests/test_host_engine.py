"""The engine with a host tier: swap preemption, session retention ``host``, layer-wise
loading, asynchrony and faults. Every case is checked against generation without a host tier
(greedy, tiny model) and against the block table's invariants."""

import dataclasses
import logging

import jax
import numpy as np
import pytest

from block_table_checks import check_structure, snapshot
from symphony_jax.engine.engine import Engine, Residency
from symphony_jax.engine.sampling import SamplingParams
from symphony_jax.memory import transfer
from symphony_jax.scheduler import state as S
from symphony_jax.scheduler.policy import Policy
from test_engine import GREEDY, PARAMS, ROOMY, TIGHT, prompts, tokens_of

# One policy and one configuration for most tests, so that they share compilations; fault
# tests shrink the host tier at run time.
POLICY = Policy(preemption="swap", retention="host")


def with_host(config, host_blocks: int, groups: int = 1):
    """``config`` with a host tier, its layers in ``groups`` groups: a block then holds one
    group's layers, so the pool has ``groups`` times as many (the same memory)."""
    cache = config.cache
    return dataclasses.replace(config, cache=dataclasses.replace(
        cache, num_host_blocks=host_blocks, num_layer_groups=groups,
        num_device_blocks=(cache.num_device_blocks - 1) * groups + 1))


def run(engine: Engine, limit: int = 400) -> int:
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
        assert steps < limit, "the engine made no progress"
    return steps


def check_blocks(engine: Engine) -> None:
    """No block leaked: the table is consistent, and what it holds is the idle sessions'."""
    scheduler = engine.device.scheduler
    check_structure(snapshot(scheduler.blocks), scheduler.blocks.block_size)
    status = np.asarray(scheduler.requests.status)
    held = np.asarray(scheduler.blocks.num_tokens)[:, status != S.FINISHED]
    assert (held == 0).all(), "only idle sessions hold blocks once everything finished"


def host_engine(host_blocks: int = 64, disk_dir=None) -> Engine:
    engine = Engine(with_host(TIGHT, 64), PARAMS, policy=POLICY, disk_dir=disk_dir)
    engine.host.tier.capacity_blocks = host_blocks
    return engine


def swap_batch(engine: Engine) -> None:
    """Four requests that do not fit the tight pool together generate what they would alone."""
    batch = prompts(1, [22, 25, 19, 28])
    ids = [engine.add_request(p, SamplingParams(max_tokens=10)) for p in batch]
    run(engine)
    expected = Engine(ROOMY, PARAMS).generate(batch, SamplingParams(max_tokens=10))
    assert [engine.result(i).token_ids for i in ids] == tokens_of(expected)


def two_turns(engine: Engine, others=(40, 40), meanwhile=lambda: None, first_len: int = 20):
    """Session 7's first turn, other sessions that need the pool, ``meanwhile()``, then
    session 7's second turn. Returns (second turn's id, its expected tokens, the history's
    length, the new tokens' count)."""
    first, second = prompts(2, [first_len, 6])
    turn1 = engine.add_request(first, GREEDY, session_id=7)
    run(engine)
    for i, prompt in enumerate(prompts(3, others)):
        engine.add_request(prompt, GREEDY, session_id=100 + i)
    run(engine)
    meanwhile()
    turn2 = engine.add_request(second, GREEDY, session_id=7)
    run(engine)
    history = first + engine.result(turn1).token_ids
    expected = Engine(ROOMY, PARAMS).generate([history + second], GREEDY)[0].token_ids
    return turn2, expected, len(history), len(second)


def counts_of(engine: Engine, request_id: int) -> tuple[int, int]:
    records = engine.records()
    i = records.request_id.tolist().index(request_id)
    return int(records.prefill_tokens[i]), int(records.recomputed_tokens[i])


def test_swap_preemption_restores_instead_of_recomputing():
    engine = host_engine()
    swap_batch(engine)
    stats = engine.host.stats
    assert stats.swapped_out > 0 and stats.restored == stats.swapped_out and stats.lost == 0
    assert engine.records().recomputed_tokens.sum() == 0
    check_blocks(engine)


def test_host_retention_restores_the_history():
    engine = host_engine()
    turn2, expected, _, new = two_turns(engine)
    assert engine.result(turn2).token_ids == expected
    assert engine.host.stats.restored == 1 and engine.host.stats.written_back > 0
    # The device copy was dropped for the other sessions; only the first turn's last token
    # (never computed) and the new input are computed.
    assert counts_of(engine, turn2) == (1 + new, 0)
    check_blocks(engine)


def test_a_migrated_session_evicts_the_least_recently_used_idle_one():
    """With every slot holding an idle session, a session migrating in takes the least recently
    used one's slot (as a fresh request would at admission) and continues exactly."""
    src, dst = host_engine(), host_engine()
    first, second = prompts(2, [20, 6])
    turn1 = src.add_request(first, GREEDY, session_id=7)
    run(src)
    others = [100 + i for i in range(dst.config.scheduler.slots)]
    for session, prompt in zip(others, prompts(3, [6] * len(others))):
        dst.add_request(prompt, GREEDY, session_id=session)
        run(dst)  # one at a time: session 100 is the least recently used
    chunks, tokens = src.export_session(7, transfer.jax.devices()[0])
    assert dst.import_session(7, chunks, tokens)
    assert sorted(dst.slot_session.tolist()) == sorted([7, *others[1:]])
    history = first + src.result(turn1).token_ids
    turn2 = dst.add_request(second, GREEDY, session_id=7, history=history)
    run(dst)
    expected = Engine(ROOMY, PARAMS).generate([history + second], GREEDY)[0].token_ids
    assert dst.result(turn2).token_ids == expected
    assert counts_of(dst, turn2) == (1 + len(second), 0)
    check_blocks(dst)


@pytest.mark.parametrize("layerwise", [False, True])
def test_a_restore_wider_than_a_steps_budget(layerwise):
    """A history of 11 blocks comes back at once: more blocks than a step's token budget
    (64 tokens: 9 blocks) ever reserves for computing."""
    engine = Engine(with_host(TIGHT, 64), PARAMS,
                    policy=dataclasses.replace(POLICY, layerwise_loading=layerwise))
    turn2, expected, history, new = two_turns(engine, first_len=74)
    assert -(-history // 8) > 9
    assert engine.result(turn2).token_ids == expected
    assert engine.host.stats.restored >= 1 and counts_of(engine, turn2) == (1 + new, 0)
    check_blocks(engine)


def test_layerwise_loading_with_layer_groups():
    """Restores loaded inside the layer loop, into two layer groups' blocks."""
    engine = Engine(with_host(TIGHT, 64, groups=2), PARAMS,
                    policy=dataclasses.replace(POLICY, layerwise_loading=True))
    swap_batch(engine)
    assert engine.host.stats.restored > 0
    turn2, expected, _, new = two_turns(engine)
    assert engine.result(turn2).token_ids == expected
    assert counts_of(engine, turn2) == (1 + new, 0)
    check_blocks(engine)


def test_a_purge_takes_the_upper_layer_group_and_the_next_turn_loads_it_back():
    """Two layer groups (one layer each): another session needing room takes only the upper
    group of session 7, whose host copy is current; session 7 keeps its lower layer on the
    device, and its next turn restores the upper one, layer by layer, and computes no
    history. (A restore that loads first writes through the same table rows.)"""
    engine = Engine(with_host(TIGHT, 64, groups=2), PARAMS,
                    policy=dataclasses.replace(POLICY, layerwise_loading=True))
    seen = {}

    def partly_resident():
        seen["where"] = engine.residency(7)
        slot, idle = engine._idle_slot(7)
        seen["idle"] = idle and int(engine.device.scheduler.requests.status[slot]) == S.FINISHED

    turn2, expected, history, new = two_turns(engine, others=(60,), meanwhile=partly_resident)
    assert seen == {"where": Residency((history - 1, 0), history - 1), "idle": True}
    assert engine.result(turn2).token_ids == expected
    assert counts_of(engine, turn2) == (1 + new, 0)
    assert engine.host.stats.restored == 1
    upper_group_blocks = -(-(history - 1) // engine.config.cache.block_size)
    assert engine.host.stats.blocks_in == upper_group_blocks  # the lower group stayed put
    check_blocks(engine)


def test_a_fill_brings_the_purged_group_back_before_the_next_turn():
    """After a purge left session 7 its lower group, ``prefetch_session`` (what an advisory
    does for a session placed where its K,V already is) copies the upper group back into free
    blocks; session 7's next turn then restores nothing and computes no history."""
    engine = Engine(with_host(TIGHT, 64, groups=2), PARAMS,
                    policy=dataclasses.replace(POLICY, layerwise_loading=True))
    seen = {}

    def refill():
        seen["purged"] = engine.residency(7).device_tokens
        assert engine.drop_session(100)
        engine.prefetch_session(7)
        engine.step()  # nothing to run: it reads the free blocks
        engine.settle_imports()
        seen["filled"] = engine.residency(7).device_tokens

    turn2, expected, history, new = two_turns(engine, others=(60,), meanwhile=refill)
    assert seen == {"purged": (history - 1, 0), "filled": (history - 1, history - 1)}
    assert engine.result(turn2).token_ids == expected
    assert counts_of(engine, turn2) == (1 + new, 0)
    assert engine.host.stats.prefetched == 1 and engine.host.stats.restored == 0
    upper_group_blocks = -(-(history - 1) // engine.config.cache.block_size)
    assert engine.host.stats.blocks_in == upper_group_blocks  # the lower group stayed put
    check_blocks(engine)


def test_unchanged_blocks_are_written_once():
    engine = host_engine()
    engine.add_request(prompts(4, [37])[0], SamplingParams(max_tokens=20), session_id=1)
    run(engine)
    tokens = 37 + 20 - 1  # the last sampled token's K,V is never computed
    block = TIGHT.cache.block_size
    # Full blocks once each as they fill, and the last partial block once when idle.
    assert engine.host.stats.blocks_out == -(-tokens // block)
    assert engine.host.tier.tokens(engine.requests[0].slot) == tokens


def test_a_step_does_not_wait_for_an_offload(monkeypatch):
    """While a swapped request's copy is incomplete, the other requests keep generating and
    the swapped one does not resume; it resumes once the copy completes."""
    copy_done = {"now": False}
    real_is_ready = transfer.Transfer.is_ready
    monkeypatch.setattr(transfer.Transfer, "is_ready",
                        lambda self: copy_done["now"] and real_is_ready(self))
    batch = prompts(1, [22, 25, 19, 28])
    engine = host_engine()
    ids = [engine.add_request(p, SamplingParams(max_tokens=10)) for p in batch]
    status = lambda: np.asarray(engine.device.scheduler.requests.status)
    while not (status() == S.OFFLOADED).any():
        engine.step()
    swapped = int(np.flatnonzero(status() == S.OFFLOADED)[0])
    request = engine.requests[int(engine.slot_request[swapped])]
    produced, others = len(request.output), []
    for _ in range(10):
        outputs = engine.step()
        others += [o for o in outputs if o.request_id != request.request_id and o.new_token_ids]
        assert status()[swapped] == S.OFFLOADED and len(request.output) == produced
    assert others, "the other requests kept generating"
    copy_done["now"] = True
    run(engine)
    expected = Engine(ROOMY, PARAMS).generate(batch, SamplingParams(max_tokens=10))
    assert [engine.result(i).token_ids for i in ids] == tokens_of(expected)


def test_full_host_tier_falls_back_to_recompute():
    engine = host_engine(host_blocks=1)
    swap_batch(engine)
    records = engine.records()
    assert engine.host.stats.lost > 0 and engine.host.stats.restored == 0
    assert records.prefill_tokens.sum() > records.input_tokens.sum(), "lost K,V is recomputed"
    check_blocks(engine)


def test_a_session_evicted_from_the_host_recomputes():
    # 6 host blocks: the other sessions' write-backs push session 7 out.
    engine = host_engine(host_blocks=6)
    turn2, expected, history, new = two_turns(engine)
    assert engine.result(turn2).token_ids == expected
    assert engine.host.tier.evictions > 0 and engine.host.stats.restored == 0
    computed, recomputed = counts_of(engine, turn2)
    assert (computed, recomputed) == (history + new, history - 1)
    check_blocks(engine)


def test_host_policies_need_a_host_tier():
    with pytest.raises(ValueError, match="num_host_blocks"):
        Engine(TIGHT, PARAMS, policy=Policy(preemption="swap"))


def test_a_session_evicted_to_disk_comes_back(tmp_path):
    engine = host_engine(host_blocks=6, disk_dir=tmp_path)
    turn2, expected, _, new = two_turns(engine)
    assert engine.result(turn2).token_ids == expected
    stats = engine.host.stats
    assert stats.to_disk > 0 and stats.from_disk == 1 and stats.restored == 1
    assert counts_of(engine, turn2) == (1 + new, 0)
    check_blocks(engine)


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_a_damaged_disk_entry_is_recomputed(tmp_path, damage):
    engine = host_engine(host_blocks=6, disk_dir=tmp_path)

    def damage_session_7():
        files = sorted(f for f in (tmp_path / "7").rglob("*") if f.is_file())
        assert files, "session 7 was saved to disk"
        largest = max(files, key=lambda f: f.stat().st_size)
        if damage == "delete":
            largest.unlink()
        else:
            largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])

    turn2, expected, history, new = two_turns(engine, meanwhile=damage_session_7)
    assert engine.result(turn2).token_ids == expected
    assert engine.host.stats.from_disk == 0 and engine.host.stats.restored == 0
    assert counts_of(engine, turn2) == (history + new, history - 1)
    assert engine.host.stats.lost > 0
    check_blocks(engine)


def test_steps_compiled_ahead_on_another_device_do_not_compile_while_serving(caplog):
    """Engine B, on another device, compiles the steps engine A ran (``compile_steps``: A's
    ``step_shapes``) before serving what A served: no step compiles then. A's restores, loaded
    layer by layer into two layer groups, come in power-of-two buffers (``StepShape``)."""
    config = with_host(TIGHT, 64, groups=2)
    policy = dataclasses.replace(POLICY, layerwise_loading=True)
    a = Engine(config, PARAMS, policy=policy, device=jax.devices()[0])
    b = Engine(config, PARAMS, policy=policy, device=jax.devices()[1])
    turn2, expected, _, _ = two_turns(a)  # compiles the reference engine's steps as well
    assert a.result(turn2).token_ids == expected
    loaded = [s.restores for s in a.step_shapes if s.restores is not None]
    assert loaded and all(n & (n - 1) == 0 for _, n in loaded)
    b.compile_steps(a.step_shapes)
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        turn2, expected, _, _ = two_turns(b)
    assert b.result(turn2).token_ids == expected
    assert not [r for r in caplog.records if "XLA compilation of jit(run)" in r.message]
    assert b.step_shapes == a.step_shapes
