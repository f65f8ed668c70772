"""The engine on the tiny model: exact generation under batching, preemption and retention."""

import jax
import numpy as np
import pytest

from symphony_jax.config import CacheConfig, EngineConfig, SchedulerConfig, model_preset
from symphony_jax.engine import device_step
from symphony_jax.engine.engine import Engine
from symphony_jax.engine.sampling import SamplingParams
from symphony_jax.model.params import init_params
from symphony_jax.scheduler import batch
from symphony_jax.scheduler.policy import Policy

TINY = model_preset("tiny")
PARAMS = init_params(TINY, jax.random.key(0))
ROOMY = EngineConfig(TINY, CacheConfig(block_size=8, num_device_blocks=96),
                     SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64,
                                     max_model_len=128, num_slots=8))
# 12 usable blocks of 8 tokens: four requests of ~30 tokens cannot all stay resident.
TIGHT = EngineConfig(TINY, CacheConfig(block_size=8, num_device_blocks=13), ROOMY.scheduler)
GREEDY = SamplingParams(max_tokens=8)


def prompts(seed: int, lengths) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, TINY.vocab_size, n).tolist() for n in lengths]


def tokens_of(generations) -> list[list[int]]:
    return [g.token_ids for g in generations]


def test_batched_equals_one_by_one():
    batch = prompts(0, [5, 17, 30, 9, 12, 3])
    together = tokens_of(Engine(ROOMY, PARAMS).generate(batch, GREEDY))
    alone = [tokens_of(Engine(ROOMY, PARAMS).generate([p], GREEDY))[0] for p in batch]
    assert together == alone
    assert all(len(t) == GREEDY.max_tokens for t in together)


def test_preempted_and_resumed_requests_generate_the_same_tokens():
    batch = prompts(1, [22, 25, 19, 28])
    engine = Engine(TIGHT, PARAMS)
    preempted = []
    ids = [engine.add_request(p, SamplingParams(max_tokens=10)) for p in batch]
    while engine.has_unfinished():
        engine.step()
        preempted.append(int(engine.device.scheduler.requests.preemptions.sum()))
    assert max(preempted) > 0, "the tight pool should have forced a preemption"
    uninterrupted = Engine(ROOMY, PARAMS).generate(batch, SamplingParams(max_tokens=10))
    assert [engine.result(i).token_ids for i in ids] == tokens_of(uninterrupted)


@pytest.mark.parametrize("retention", ["keep", "drop"])
def test_second_turn_continues_the_session(retention):
    """A session's second turn sees the first turn's prompt and output as its history."""
    engine = Engine(ROOMY, PARAMS, policy=Policy(retention=retention))
    first, second = prompts(2, [20, 6])
    turn1 = engine.add_request(first, GREEDY, session_id=7)
    while engine.has_unfinished():
        engine.step()
    turn2 = engine.add_request(second, GREEDY, session_id=7)
    while engine.has_unfinished():
        engine.step()
    history = first + engine.result(turn1).token_ids
    fresh = Engine(ROOMY, PARAMS).generate([history + second], GREEDY)[0]
    assert engine.result(turn2).token_ids == fresh.token_ids
    records = engine.records()
    computed = dict(zip(records.request_id.tolist(), records.prefill_tokens.tolist()))
    recomputed = dict(zip(records.request_id.tolist(), records.recomputed_tokens.tolist()))
    # The first turn's last output token never had its K,V computed: it is not recomputed.
    if retention == "keep":  # only that token and the new input are computed
        assert computed[turn2] == 1 + len(second) and recomputed[turn2] == 0
    else:
        assert computed[turn2] == len(history) + len(second)
        assert recomputed[turn2] == len(history) - 1


def test_no_recompilation_once_warm():
    """120 steps of changing batches: the second half compiles nothing new."""
    engine = Engine(ROOMY, PARAMS)
    rng = np.random.default_rng(3)
    cached = lambda: (device_step.run._cache_size(), device_step.schedule._cache_size(),
                      device_step.admit._cache_size())
    sizes = [cached()]  # other tests' configurations share the process-wide caches
    for step in range(120):
        if step % 3 == 0:
            for p in prompts(step, rng.integers(1, 40, rng.integers(0, 3))):
                engine.add_request(p, SamplingParams(max_tokens=int(rng.integers(1, 12))))
        engine.step()
        if step in (59, 119):
            sizes.append(cached())
    assert sizes[1] == sizes[2]
    limits = ROOMY.scheduler
    step_shapes = {batch.shape(s, t, decode, limits)
                   for s in range(1, limits.max_num_seqs + 1)
                   for t in range(s, limits.max_num_batched_tokens + 1) for decode in (0, 1)}
    assert sizes[2][0] - sizes[0][0] <= len(step_shapes)


def test_bad_requests_are_rejected_while_the_others_complete():
    engine = Engine(TIGHT, PARAMS)
    good = prompts(4, [10, 12])
    ids = [engine.add_request(good[0], GREEDY),
           engine.add_request(list(range(125)), GREEDY),  # 125 + 8 > max_model_len
           engine.add_request(list(range(100)), SamplingParams(max_tokens=20)),  # > the pool
           engine.add_request(good[1], GREEDY)]
    while engine.has_unfinished():
        engine.step()
    reasons = [engine.result(i).finish_reason for i in ids]
    assert reasons[0] == reasons[3] == "length"
    assert reasons[1] == "rejected: prompt plus max_new_tokens exceeds max_model_len"
    assert reasons[2] == "rejected: prompt needs more blocks than the pool has"
    alone = Engine(ROOMY, PARAMS).generate(good, GREEDY)
    assert [engine.result(i).token_ids for i in (ids[0], ids[3])] == tokens_of(alone)


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=0), "max_tokens=0"), (dict(temperature=-1.0), "temperature=-1.0"),
    (dict(top_k=-2), "top_k=-2"), (dict(top_p=0.0), "top_p=0.0"), (dict(seed=-1), "seed=-1"),
    (dict(stop_token_ids=(3, -4)), "stop_token_ids"),
])
def test_invalid_sampling_parameters_raise(kwargs, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**kwargs)


def test_bad_prompts_raise():
    engine = Engine(ROOMY, PARAMS)
    with pytest.raises(ValueError, match="prompt\\[1\\]=999: expected a token id, an integer in "
                       "\\[0, 256\\)"):
        engine.add_request([3, 999])
    with pytest.raises(ValueError, match="a text prompt needs the engine's tokenizer"):
        engine.add_request("hello")
    with pytest.raises(ValueError, match="expected a SamplingParams"):
        engine.add_request([1, 2], {"max_tokens": 3})


def test_abort_frees_the_request_and_its_blocks():
    engine = Engine(ROOMY, PARAMS)
    long, short = engine.add_request(list(range(40)), SamplingParams(max_tokens=50)), None
    engine.step()
    engine.step()
    engine.abort(long)
    short = engine.add_request([1, 2, 3], GREEDY)
    while engine.has_unfinished():
        engine.step()
    assert engine.result(long).finish_reason == "abort"
    assert engine.result(short).finish_reason == "length"
    blocks = engine.device.scheduler.blocks
    assert int(blocks.free_top) == blocks.num_blocks - 1


def test_streaming_outputs_and_timestamps():
    engine = Engine(ROOMY, PARAMS)
    ids = [engine.add_request(p, GREEDY) for p in prompts(5, [6, 14])]
    streamed = {i: [] for i in ids}
    finished = set()
    while engine.has_unfinished():
        for out in engine.step():
            streamed[out.request_id] += out.new_token_ids
            if out.finished:
                finished.add(out.request_id)
    assert finished == set(ids)
    assert [streamed[i] for i in ids] == [engine.result(i).token_ids for i in ids]
    records = engine.records()
    assert (records.arrival_s <= records.first_token_s).all()
    assert (records.first_token_s <= records.finish_s).all()
    assert records.output_tokens.tolist() == [GREEDY.max_tokens] * 2


def test_stop_tokens_end_generation():
    batch = prompts(6, [9])
    free = Engine(ROOMY, PARAMS).generate(batch, GREEDY)[0].token_ids
    stop = free[2]
    out = Engine(ROOMY, PARAMS).generate(batch, SamplingParams(max_tokens=8,
                                                               stop_token_ids=(stop,)))[0]
    assert out.token_ids == free[: free.index(stop) + 1] and out.finish_reason == "stop"


def test_prefix_cache_hits_are_exact():
    """A prompt sharing a cached prefix starts from it and generates what it would without."""
    shared = prompts(7, [35])[0]
    a, b = shared + [1, 2, 3], shared + [9, 8]
    engine = Engine(ROOMY, PARAMS, policy=Policy(prefix_caching=True))
    first = engine.generate([a], GREEDY)[0]
    second = engine.generate([b], GREEDY)[0]
    assert engine.requests[second.request_id].cached_tokens == 32  # 4 full blocks of 8
    assert engine.records().prefill_tokens.tolist() == [len(a), len(b) - 32]
    assert [first.token_ids, second.token_ids] == tokens_of(
        Engine(ROOMY, PARAMS).generate([a, b], GREEDY))


def test_cache_salts_share_blocks_within_a_tenant_only():
    """Requests share cached blocks only under one salt; a session keeps its salt."""
    shared = prompts(8, [40])[0]
    engine = Engine(ROOMY, PARAMS, policy=Policy(prefix_caching=True))

    def cached(prompt, **kwargs):
        request = engine.add_request(prompt, GREEDY, **kwargs)
        while engine.has_unfinished():
            engine.step()
        return engine.requests[request].cached_tokens

    assert cached(shared + [1], cache_salt="a") == 0
    assert cached(shared + [2], cache_salt="b") == 0
    assert cached(shared + [3]) == 0
    assert cached(shared + [4], cache_salt="a") == 40
    assert cached(shared + [5], session_id=7, cache_salt="b") == 40
    # The session's next turn, and a new session started on its tokens: salt b by default.
    history = engine.sessions[7]
    assert cached([6], session_id=7) == len(history) - 1  # its own K,V, kept
    assert cached(history + [6], session_id=8) == 40 and engine.session_salts[8] is None


def test_blocks_completed_by_generation_are_cached_with_their_prompt():
    """Keys of blocks that sampled tokens complete are chained on the device, equal to the
    host's keys of the same tokens: a later prompt repeating prompt and output hits them all."""
    prompt = prompts(9, [13])[0]
    engine = Engine(ROOMY, PARAMS, policy=Policy(prefix_caching=True))
    out = engine.generate([prompt], SamplingParams(max_tokens=20))[0]
    sequence = prompt + out.token_ids  # 33 tokens: blocks 2-4 completed by generation
    again = engine.generate([sequence[:32] + [5, 6]], GREEDY)[0]
    assert engine.requests[again.request_id].cached_tokens == 32
