"""The engine's device work: admission with its token writes, and one fused step.

Everything a step needs lives on the device — scheduler state, KV pool, every slot's tokens
(prompt and generated) and sampling parameters — so a step is one dispatch: lay out the
scheduled tokens, gather their ids, run the model, sample, append the sampled tokens, flag stops
and commit. The host only reads back a few counts (to pick the step's shape bucket) and the
sampled tokens (to stream them).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from symphony_jax.config import EngineConfig
from symphony_jax.engine import hashing
from symphony_jax.engine.sampling import SamplingTable, is_stop, sample
from symphony_jax.memory import transfer
from symphony_jax.memory.kv_cache import KVPool
from symphony_jax.model import llama
from symphony_jax.model.params import LlamaParams
from symphony_jax.scheduler import admission, batch, prefix_cache
from symphony_jax.scheduler import state as S
from symphony_jax.scheduler import step as scheduler_step
from symphony_jax.scheduler.policy import Policy

i32 = jnp.int32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DeviceState:
    """What the engine keeps on its device (R slots, L = max_model_len)."""

    scheduler: S.SchedulerState
    pool: KVPool
    tokens: jax.Array  # i32[R, L]  each slot's sequence: prompt (history included), generated
    sampling: SamplingTable
    # With prefix caching (else MB = 0): each slot's root key, then the keys of its sequence's
    # blocks whose tokens are all known (``engine.hashing``), and its root tag.
    block_keys: jax.Array  # u32[R, MB + 1, K]
    root_tags: jax.Array  # u32[R]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepOutputs:
    """What one step produced, packed in two arrays that the host reads in one transfer
    (B sequences in the batch, R slots). Rows are named by the constants below."""

    sequences: jax.Array  # i32[4, B]  per batch sequence: SLOT (R: padding), TOKEN (sampled),
    #                                  SAMPLED (1: it sampled this step), FINISHED (1)
    counters: jax.Array  # i32[4, R]   per slot: REQUEST id, CACHED prompt tokens at admission,
    #                                  COMPUTED prompt tokens, RECOMPUTED history tokens


SLOT, TOKEN, SAMPLED, FINISHED = range(4)  # rows of StepOutputs.sequences
NUM_COUNTS = 4  # counts ``schedule`` returns before its per-slot rows
REQUEST, CACHED, COMPUTED, RECOMPUTED = range(4)  # rows of StepOutputs.counters


DROPPED = np.iinfo(np.int32).max  # a block id past any pool's: writes to it are dropped


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Restores:
    """One layer group's blocks that a step loads from host memory layer by layer: block i of
    ``k, v`` goes to table column ``columns[i]`` of slot ``slots[i]``. N is a power of two and
    the blocks past the restored ones are padding (slot R: dropped), so that ``run`` compiles
    for few shapes (``StepShape.restores``)."""

    k: jax.Array  # [P_g, KVH, N, BS, D], host memory
    v: jax.Array
    slots: jax.Array  # i32[N]
    columns: jax.Array  # i32[N]

    def loads(self, block_ids: jax.Array, group: int) -> llama.BlockLoads:
        ids = block_ids[group].at[self.slots, self.columns].get(mode="fill", fill_value=DROPPED)
        return llama.BlockLoads(self.k, self.v, ids)


@dataclasses.dataclass(frozen=True)
class StepShape:
    """What ``run`` compiles for: the batch's bucket and, when the step loads restores layer by
    layer, the first layer group they load (every group above it loads too) and the number of
    blocks each group's ``Restores`` holds."""

    num_seqs: int
    num_tokens: int
    decode: bool
    restores: tuple[int, int] | None = None  # (first group, N)

    @staticmethod
    def of_restores(restores: tuple[Restores | None, ...] | None) -> tuple[int, int] | None:
        if restores is None:
            return None
        first = next(g for g, r in enumerate(restores) if r is not None)
        return first, restores[first].k.shape[2]


def pack(config: EngineConfig, group: int, chunks, num_blocks: int, device) -> Restores:
    """Layer ``group``'s restores of ``num_blocks`` blocks: host ``chunks`` ``(k, v, slot,
    first block)`` (``transfer.Chunk`` arrays of the group) copied into one buffer each for K
    and V in ``device``'s host memory, the blocks past theirs padding."""
    model = config.model
    shape = (config.layer_groups.count(group), model.num_kv_heads, num_blocks,
             config.cache.block_size, model.head_dim)
    k, v = (np.zeros(shape, model.jnp_dtype) for _ in "kv")
    slots = np.full(num_blocks, config.scheduler.slots, np.int32)
    columns = np.zeros(num_blocks, np.int32)
    at = 0
    for chunk_k, chunk_v, slot, first_block in chunks:
        n = chunk_k.shape[2]
        k[:, :, at:at + n], v[:, :, at:at + n] = np.asarray(chunk_k), np.asarray(chunk_v)
        slots[at:at + n], columns[at:at + n] = slot, np.arange(first_block, first_block + n)
        at += n
    k, v = jax.device_put((k, v), transfer.host_sharding(device))
    return Restores(k, v, *jax.device_put((slots, columns), device))


def padding(config: EngineConfig, restores: tuple[int, int] | None,
            device) -> tuple[Restores | None, ...] | None:
    """Each layer group's ``Restores`` of ``StepShape.restores`` that load nothing (to compile
    ``run`` ahead of time: an abstract value would not say the buffers are in host memory)."""
    if restores is None:
        return None
    first, num_blocks = restores
    return tuple(None if g < first else pack(config, g, (), num_blocks, device)
                 for g in range(config.cache.num_layer_groups))


def empty_block_keys(config: EngineConfig, prefix_caching: bool) -> tuple[jax.Array, jax.Array]:
    """``DeviceState.block_keys`` and ``root_tags`` of an engine with no request yet."""
    width = config.max_blocks_per_seq if prefix_caching else 0
    R = config.scheduler.slots
    return (jnp.zeros((R, width + 1, prefix_cache.KEY_WORDS), jnp.uint32),
            jnp.zeros(R, jnp.uint32))


def _by_block(tokens: jax.Array, blocks) -> jax.Array:
    """i32[N, MB, BS]: sequences ``tokens`` (i32[N, L]) cut into blocks: what verifies a
    prefix cache hit."""
    width = blocks.max_blocks_per_seq * blocks.block_size
    tokens = jnp.pad(tokens, ((0, 0), (0, max(0, width - tokens.shape[1]))))[:, :width]
    return tokens.reshape(tokens.shape[0], blocks.max_blocks_per_seq, blocks.block_size)


def _prefixes(device: DeviceState, rows: jax.Array, tokens: jax.Array) -> prefix_cache.Prefixes:
    """Sequences ``tokens`` (i32[N, L]) of slots ``rows`` (i32[N]) as the prefix cache names
    their blocks: keys, the token ids that verify them, root tags."""
    return prefix_cache.Prefixes(device.block_keys.at[rows, 1:].get(mode="fill", fill_value=0),
                                 _by_block(tokens, device.scheduler.blocks),
                                 device.root_tags.at[rows].get(mode="fill", fill_value=0))


def _hash_completed(device: DeviceState, slots: jax.Array, positions: jax.Array,
                    sampled: jax.Array) -> jax.Array:
    """``device.block_keys`` with the key of each block that a sampled token completes: the
    token at ``positions[b]`` of slot ``slots[b]`` where ``sampled[b]`` (``device.tokens``
    already holds it)."""
    bs = device.scheduler.blocks.block_size
    block = positions // bs
    completes = sampled & ((positions + 1) % bs == 0)
    parent = device.block_keys.at[slots, block].get(mode="fill", fill_value=0)
    tokens = device.tokens.at[slots[:, None], block[:, None] * bs + jnp.arange(bs)].get(
        mode="fill", fill_value=0)
    rows = jnp.where(completes, slots, device.tokens.shape[0])
    return device.block_keys.at[rows, block + 1].set(hashing.chain(parent, tokens), mode="drop")


@functools.partial(jax.jit, donate_argnames="device", static_argnames=("config", "policy"))
def admit(device: DeviceState, new: S.NewRequests, prompts: jax.Array, rows: SamplingTable,
          keys: jax.Array, roots: jax.Array, *, config: EngineConfig, policy: Policy):
    """Admit ``new`` requests and write their prompts (``i32[N, L]``), sampling rows and, with
    prefix caching, their prompts' block keys (``u32[N, MB + 1, K]``: root key, then the full
    blocks', zeros after) and root tags (``u32[N]``) into their slots. Returns the device
    state, each request's slot and reason."""
    named = None
    if policy.prefix_caching:
        named = prefix_cache.Prefixes(keys[:, 1:], _by_block(prompts, device.scheduler.blocks),
                                      roots)
    scheduler, slots, reasons = admission.admit(device.scheduler, new, limits=config.scheduler,
                                                policy=policy, prompts=named)
    target = jnp.where(reasons == S.ADMITTED, slots, device.tokens.shape[0])
    return dataclasses.replace(
        device, scheduler=scheduler, tokens=device.tokens.at[target].set(prompts, mode="drop"),
        sampling=device.sampling.put(target, rows),
        block_keys=device.block_keys.at[target].set(keys, mode="drop"),
        root_tags=device.root_tags.at[target].set(roots, mode="drop")), slots, reasons


@functools.partial(jax.jit, donate_argnames="scheduler",
                   static_argnames=("limits", "policy", "record"))
def schedule(scheduler: S.SchedulerState, now, *, limits, policy: Policy, record: bool = False):
    """``scheduler.step.schedule``, with what the host reads packed for one read: ``counts``
    = (sequences, tokens, decode only, free blocks after the step's reservations); when K,V
    moves to and from a host tier (``policy.uses_host``) each slot's cached tokens before the
    step, ``plan.offloads`` and ``plan.restore_groups`` (``3R`` more); with ``record``, each slot's
    query and context lengths (``2R`` more, last). When K,V moves, also returns the block ids
    before the step (``i32[G, R, MB]``): an offloaded slot's blocks are read from them."""
    tokens, block_ids = scheduler.cached_tokens, scheduler.blocks.block_ids
    scheduler, plan = scheduler_step.schedule(scheduler, now, limits=limits, policy=policy)
    counts = [jnp.stack([plan.num_seqs, plan.num_tokens, plan.decode_only.astype(i32),
                         scheduler.blocks.free_top])]
    if policy.uses_host:
        counts += [tokens, plan.offloads.astype(i32), plan.restore_groups]
    if record:  # the context a step's query attends to: its reservation covers the query
        counts += [plan.query_lens, scheduler.cached_tokens - plan.query_lens]
    return scheduler, plan, jnp.concatenate(counts), block_ids if policy.uses_host else None


@functools.partial(jax.jit, donate_argnames="device", static_argnames=(
    "num_seqs", "num_tokens", "decode", "config", "policy", "impl"))
def run(device: DeviceState, params: LlamaParams, plan: scheduler_step.StepPlan, now,
        restores: tuple[Restores | None, ...] | None = None, *, num_seqs: int,
        num_tokens: int, decode: bool, config: EngineConfig, policy: Policy,
        impl: str) -> tuple[DeviceState, StepOutputs]:
    """Run the planned step in a batch of ``num_seqs`` sequences and ``num_tokens`` tokens
    (buckets at least the plan's counts; ``decode``: every sequence runs one token), loading
    ``restores`` (each layer group's, or None) into their blocks layer by layer."""
    scheduler = device.scheduler
    R = scheduler.num_slots
    layout = batch.layout(scheduler.blocks, plan, num_seqs, num_tokens)
    ids = device.tokens.at[layout.token_slots, layout.positions].get(mode="fill", fill_value=0)
    loads = None if restores is None else tuple(
        None if r is None else r.loads(scheduler.blocks.block_ids, g)
        for g, r in enumerate(restores))
    logits, pool = llama.forward(params, device.pool, ids, layout, config=config.model,
                                 layer_groups=config.layer_groups, decode=decode, impl=impl,
                                 loads=loads)
    samples = plan.samples.at[layout.seq_slots].get(mode="fill", fill_value=False)
    generated = scheduler.requests.num_generated.at[layout.seq_slots].get(mode="fill",
                                                                         fill_value=0)
    table = device.sampling.at(layout.seq_slots)
    sampled = sample(logits, table, generated)
    # The sampled token is the sequence's next one: position = its context length.
    writes = jnp.where(samples, layout.seq_slots, R)
    tokens = device.tokens.at[writes, layout.context_lens].set(sampled, mode="drop")
    stop = jnp.zeros(R, bool).at[writes].set(is_stop(sampled, table.stop_ids), mode="drop")
    device = dataclasses.replace(device, tokens=tokens)
    sequences = None
    if policy.prefix_caching:  # the batch's sequences, for blocks that finish cached
        device = dataclasses.replace(device, block_keys=_hash_completed(
            device, layout.seq_slots, layout.context_lens, samples))
        sequences = _prefixes(device, layout.seq_slots,
                              tokens.at[layout.seq_slots].get(mode="fill", fill_value=0))
    scheduler, finished = scheduler_step.commit(scheduler, plan, stop, now, policy=policy,
                                                seq_slots=layout.seq_slots, sequences=sequences)
    r = scheduler.requests
    outputs = StepOutputs(
        jnp.stack([layout.seq_slots, sampled, samples.astype(i32),
                   finished.at[layout.seq_slots].get(mode="fill", fill_value=False).astype(i32)]),
        jnp.stack([r.request_id, r.cached_at_admission, r.computed, r.recomputed_history]))
    return dataclasses.replace(device, scheduler=scheduler, pool=pool), outputs
