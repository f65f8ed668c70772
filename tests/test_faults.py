"""One bad request never hurts another: requests the engine cannot hold, double aborts, file
system faults under the disk tier, and reproducible runs with a host tier. Every valid request
is checked against the same prompt generated alone (greedy, tiny model)."""

import dataclasses
import errno
import itertools
import logging
import pathlib
import pickle

import hypothesis.strategies as st
import jax
import numpy as np
import pytest
from hypothesis import given, settings

from symphony_jax.engine.engine import Engine
from symphony_jax.engine.sampling import SamplingParams, SamplingTable
from symphony_jax.memory import disk_tier
from symphony_jax.scheduler import batch, tiers
from test_engine import GREEDY, PARAMS, ROOMY, TIGHT, prompts, tokens_of
from test_host_engine import POLICY, host_engine, run, two_turns, with_host

POOL = prompts(11, [5, 9, 14, 7, 20, 3])  # valid prompts, each generated alone once below


@pytest.fixture(scope="module")
def alone():
    """Each prompt of POOL generated alone: the reference."""
    return {tuple(p): tokens_of(Engine(ROOMY, PARAMS).generate([p], GREEDY))[0] for p in POOL}


# ---------------------------------------------------------------- requests (F1-F3)

BAD_REQUESTS = {  # add_request's arguments -> the field its error names
    "session id beyond int32": (dict(session_id=2**31), "session_id=2147483648"),
    "negative session id": (dict(session_id=-1), "session_id=-1"),
    "bool session id": (dict(session_id=True), "session_id=True"),
    "too many stop tokens": (dict(sampling=SamplingParams(stop_token_ids=tuple(range(9)))),
                             "9 stop tokens"),
    "stop token beyond the vocabulary": (dict(sampling=SamplingParams(stop_token_ids=(999,))),
                                         r"stop_token_ids\[0\]=999"),
    "float token id": (dict(prompt=[1, 2.5]), r"prompt\[1\]=2.5"),
    "bool token id": (dict(prompt=[True, 2]), r"prompt\[0\]=True"),
    "float history": (dict(history=[1.0]), r"history\[0\]=1.0"),
    "salt not a str": (dict(cache_salt=3), "cache_salt=3"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_a_bad_request_is_refused_where_it_enters_and_its_batch_runs(case, alone):
    kwargs, message = BAD_REQUESTS[case]
    engine = Engine(ROOMY, PARAMS)
    good = [engine.add_request(p, GREEDY) for p in POOL[:3]]
    with pytest.raises(ValueError, match=message):
        engine.add_request(kwargs.pop("prompt", POOL[3]), kwargs.pop("sampling", GREEDY),
                           **kwargs)
    good.append(engine.add_request(POOL[4], GREEDY))
    run(engine)
    assert [engine.result(i).token_ids for i in good] == [alone[tuple(p)] for p in
                                                           POOL[:3] + POOL[4:5]]
    assert engine.unfinished == 0 and len(engine.requests) == 4  # nothing queued for it


def test_sampling_params_refuse_what_the_sampling_table_cannot_hold():
    for kwargs in (dict(temperature=float("inf")), dict(temperature=float("nan")),
                   dict(top_k=2**31), dict(max_tokens=2**31)):
        with pytest.raises(ValueError, match=f"SamplingParams.{next(iter(kwargs))}"):
            SamplingParams(**kwargs)


def test_a_request_that_fails_at_admission_is_rejected_alone(monkeypatch, alone):
    """Whatever still fails when a request's row is built rejects that request, with the
    reason in its result, and admits the rest of its batch."""
    rows = SamplingTable.rows

    def fail_seed_13(params, seeds, *args):
        if 13 in seeds:
            raise ValueError("seed 13 cannot be sampled")
        return rows(params, seeds, *args)

    monkeypatch.setattr(SamplingTable, "rows", staticmethod(fail_seed_13))
    engine = Engine(ROOMY, PARAMS)
    ids = [engine.add_request(p, GREEDY) for p in POOL[:2]]
    bad = engine.add_request(POOL[2], SamplingParams(max_tokens=8, seed=13))
    ids.append(engine.add_request(POOL[3], GREEDY))
    run(engine)
    assert engine.result(bad).finish_reason == "rejected: seed 13 cannot be sampled"
    assert [engine.result(i).token_ids for i in ids] == [alone[tuple(p)] for p in
                                                          POOL[:2] + POOL[3:4]]


def test_abort_is_idempotent_and_says_what_it_did(alone):
    engine = Engine(ROOMY, PARAMS)
    victim = engine.add_request(POOL[0], SamplingParams(max_tokens=50))
    engine.step()
    assert engine.abort(victim) is True
    assert engine.abort(victim) is False  # already ending
    assert engine.abort(10_000) is False and engine.abort("x") is False  # no such request
    run(engine)
    assert engine.abort(victim) is False  # ended
    later = engine.add_request(POOL[1], GREEDY)
    run(engine)
    assert engine.unfinished == 0 and not engine.has_unfinished()
    assert engine.result(victim).finish_reason == "abort"
    assert engine.result(later).token_ids == alone[tuple(POOL[1])]
    queued = engine.add_request(POOL[2], GREEDY)  # aborted before it reaches the device
    assert engine.abort(queued) is True and engine.abort(queued) is False
    assert engine.unfinished == 0


def test_generate_runs_more_prompts_than_slots_to_completion(alone):
    batch_ = POOL * 2  # 12 prompts, 8 slots
    results = Engine(ROOMY, PARAMS).generate(batch_, GREEDY)
    assert [r.finish_reason for r in results] == ["length"] * len(batch_)
    assert tokens_of(results) == [alone[tuple(p)] for p in batch_]
    with pytest.raises(ValueError, match=r"prompt\[0\]=-1"):
        Engine(ROOMY, PARAMS).generate([POOL[0], [-1]], GREEDY)


# An invalid add_request: (kwargs, whether it raises). Aborts are requests' own doing.
INVALID = st.sampled_from([dict(session_id=2**31), dict(session_id=-3), dict(session_id=True),
                           dict(prompt=[1.5, 2]), dict(prompt=[300]), dict(prompt=[]),
                           dict(sampling=SamplingParams(max_tokens=4,
                                                        stop_token_ids=tuple(range(12)))),
                           dict(cache_salt=b"x")])


@settings(max_examples=12)
@given(actions=st.lists(st.one_of(st.tuples(st.just("valid"), st.integers(0, len(POOL) - 1),
                                    st.booleans()),
                          st.tuples(st.just("invalid"), INVALID, st.just(False)),
                          st.tuples(st.just("abort"), st.integers(0, 7), st.booleans())),
                min_size=1, max_size=12),
       steps=st.lists(st.integers(0, 2), min_size=12, max_size=12))
def test_valid_requests_generate_what_they_do_alone_among_invalid_ones(actions, steps, alone):
    """A random mix of valid requests (some in sessions of their own), invalid ones and
    aborts (some doubled, some of unknown ids), with steps in between: every valid request that
    was not aborted generates exactly what it does alone."""
    engine, valid, aborted, sessions = Engine(ROOMY, PARAMS), {}, set(), itertools.count(50)
    for (kind, what, flag), n in zip(actions, steps):
        if kind == "valid" and len(valid) < ROOMY.scheduler.slots:
            session = next(sessions) if flag else None
            valid[engine.add_request(POOL[what], GREEDY, session_id=session)] = POOL[what]
        elif kind == "invalid":
            kwargs = dict(what)
            with pytest.raises(ValueError):
                engine.add_request(kwargs.pop("prompt", POOL[0]),
                                   kwargs.pop("sampling", GREEDY), **kwargs)
        elif kind == "abort":
            ids = sorted(valid)
            target = ids[what % len(ids)] if ids and what < 6 else 10_000 + what
            first = engine.abort(target)
            assert engine.abort(target) is False  # a second abort does nothing
            if first:
                aborted.add(target)
        for _ in range(n):
            engine.step()
    run(engine)
    assert engine.unfinished == 0
    for request_id, prompt in valid.items():
        result = engine.result(request_id)
        if request_id in aborted:
            assert result.finish_reason == "abort"
        else:
            assert (result.finish_reason, result.token_ids) == ("length", alone[tuple(prompt)])


# ---------------------------------------------------------------- the disk tier (F4-F8)

def refuse(monkeypatch, owner, name: str, test, error: OSError) -> None:
    """Make ``owner.name`` raise ``error`` on paths for which ``test(path)`` holds."""
    original = getattr(owner, name)

    def faulty(path, *args, **kwargs):
        if test(pathlib.Path(path)):
            raise error
        return original(path, *args, **kwargs)

    monkeypatch.setattr(owner, name, faulty)


def directory_not_writable(tmp_path, monkeypatch):  # F4
    refuse(monkeypatch, pathlib.Path, "mkdir", lambda p: p.name.startswith(".tmp-"),
           PermissionError(errno.EACCES, "Permission denied"))


def disk_full(tmp_path, monkeypatch):
    refuse(monkeypatch, pathlib.Path, "write_text", lambda p: p.name == disk_tier.MANIFEST,
           OSError(errno.ENOSPC, "No space left on device"))


def entry_not_removable(tmp_path, monkeypatch):  # F5
    refuse(monkeypatch, disk_tier.shutil, "rmtree", lambda p: p.name == "7",
           PermissionError(errno.EACCES, "Permission denied"))


def file_named_like_an_entry(tmp_path, monkeypatch):  # F6
    (tmp_path / "7").write_text("not an entry")


def junk_named_like_a_leftover(tmp_path, monkeypatch):  # F7
    (tmp_path / ".old-3").write_text("not a directory")
    (tmp_path / ".tmp-4").mkdir()


# fault -> (session 7 comes back from disk, disk faults logged)
DISK_FAULTS = {directory_not_writable: (False, True), disk_full: (False, True),
               entry_not_removable: (True, True), file_named_like_an_entry: (True, False),
               junk_named_like_a_leftover: (True, False)}


@pytest.mark.parametrize("fault", DISK_FAULTS, ids=lambda f: f.__name__)
def test_a_file_system_fault_loses_a_disk_entry_and_the_engine_serves_on(tmp_path, monkeypatch,
                                                                         caplog, fault):
    fault(tmp_path, monkeypatch)
    engine = host_engine(host_blocks=6, disk_dir=tmp_path)  # session 7 is pushed to disk
    assert not (tmp_path / ".old-3").exists() and not (tmp_path / ".tmp-4").exists()
    with caplog.at_level(logging.WARNING):
        turn2, expected, history, new = two_turns(engine)
    assert engine.result(turn2).token_ids == expected
    from_disk, faults = DISK_FAULTS[fault]
    stats = engine.host.stats
    assert stats.from_disk == int(from_disk)
    assert (stats.disk_faults > 0) == faults
    assert ("disk tier:" in caplog.text) == faults
    r = engine.requests[turn2]
    assert r.recomputed_tokens == (0 if from_disk else history - 1)


def session_7_to_disk(disk_dir, first_len: int = 27) -> Engine:
    """An engine whose host tier pushed session 7's first turn to disk."""
    engine = host_engine(host_blocks=6, disk_dir=disk_dir)
    engine.add_request(prompts(2, [first_len])[0], GREEDY, session_id=7)
    run(engine)
    for i, prompt in enumerate(prompts(3, [40, 40])):
        engine.add_request(prompt, GREEDY, session_id=100 + i)
    run(engine)
    assert 7 in engine.host.disk, "session 7 was saved to disk"
    return engine


def test_an_entry_left_by_an_earlier_engine_is_not_taken_for_another_sequence(tmp_path):  # F8
    session_7_to_disk(tmp_path)
    engine = host_engine(host_blocks=6, disk_dir=tmp_path)  # a new engine, the same directory
    prompt = prompts(9, [12])[0]  # session 7 here: a different, shorter sequence
    rid = engine.add_request(prompt, GREEDY, session_id=7)
    run(engine)
    assert engine.result(rid).token_ids == tokens_of(Engine(ROOMY, PARAMS).generate(
        [prompt], GREEDY))[0]
    assert engine.host.stats.from_disk == 0 and engine.host.stats.disk_faults == 1
    assert 7 not in engine.host.disk  # dropped


def test_an_entry_of_another_model_is_not_used(tmp_path, caplog):
    history = session_7_to_disk(tmp_path).sessions[7]
    other = jax.tree.map(lambda w: w * 1.01, PARAMS)  # the same geometry, other weights
    engine = Engine(with_host(TIGHT, 64), other, policy=POLICY, disk_dir=tmp_path)
    prompt = history + [5, 6]  # the same tokens: only the owner differs
    with caplog.at_level(logging.WARNING):
        rid = engine.add_request(prompt[len(history):], GREEDY, session_id=7, history=history)
        run(engine)
    assert "another model or cache geometry" in caplog.text
    assert engine.host.stats.from_disk == 0 and engine.host.stats.disk_faults == 1
    assert engine.result(rid).token_ids == tokens_of(Engine(ROOMY, other).generate(
        [prompt], GREEDY))[0]


def test_the_scheduler_never_takes_more_cached_tokens_than_a_prompt_has(monkeypatch):
    """A host tier claiming more of a slot's tokens than its prompt has (whatever told it so)
    is not restored from: the request computes its prompt."""
    engine = host_engine()
    admitted, R = engine.host.admitted, engine.config.scheduler.slots

    def claim_27_tokens(device, prompts_):
        device = admitted(device, prompts_)
        slots = [slot for slot, _ in prompts_]
        return dataclasses.replace(device, scheduler=tiers.stored(
            device.scheduler, jax.numpy.asarray(batch.padded(slots, R, R)),
            jax.numpy.asarray(batch.padded([27] * len(slots), R, 0))))

    monkeypatch.setattr(engine.host, "admitted", claim_27_tokens)
    prompt = prompts(9, [12])[0]
    rid = engine.add_request(prompt, GREEDY, session_id=7)
    run(engine, limit=50)
    assert engine.result(rid).token_ids == tokens_of(Engine(ROOMY, PARAMS).generate(
        [prompt], GREEDY))[0]


# ---------------------------------------------------------------- reproducible runs (F10)

def seeded_host_run(seed: int) -> tuple:
    """A seeded multi-turn workload with swap preemption and host retention on a tight pool, on
    a clock that advances by 1 ms per reading; returns everything it recorded."""
    ticks = itertools.count()
    engine = Engine(with_host(TIGHT, 64), PARAMS, policy=POLICY, start=0.0,
                    clock=lambda: next(ticks) * 1e-3, copy_completion="next_step")
    engine.host.tier.capacity_blocks = 24  # small enough to lose some copies
    rng = np.random.default_rng(seed)
    for _ in range(40):
        for _ in range(rng.integers(0, 3)):
            session = int(rng.integers(0, 6))
            if not any(r.session_id == session and r.finish_reason is None
                       for r in engine.requests.values()):
                engine.add_request(rng.integers(0, 256, int(rng.integers(3, 20))).tolist(),
                                   SamplingParams(max_tokens=int(rng.integers(2, 12))),
                                   session_id=session)
        engine.step()
    steps = run(engine)
    records = engine.records()
    outputs = [engine.result(i).token_ids for i in sorted(engine.requests)]
    return pickle.dumps((records, outputs, steps, engine.host.stats)), engine.host.stats


def test_a_seeded_host_tier_run_is_reproducible_byte_for_byte():
    first, stats = seeded_host_run(4)
    second, _ = seeded_host_run(4)
    assert min(stats.swapped_out, stats.restored, stats.written_back, stats.lost) > 0
    assert first == second


def test_copy_completion_is_checked():
    with pytest.raises(ValueError, match="copy_completion='eventually'"):
        Engine(ROOMY, PARAMS, copy_completion="eventually")
