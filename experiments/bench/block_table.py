"""Block-table benchmark: the jitted table against a plain-Python allocator, same operations.

Workload (decode-like): every slot holds a sequence; each step every sequence grows by one
token (``reserve``), and every ``churn_every`` steps ``churn`` sequences finish and new prompts
take their slots (``free`` then ``allocate``, then the step's ``reserve``). As an engine would,
the driver calls the churn step only on steps where sequences finish. Both allocators run the
same schedule, step by step interleaved (so machine noise hits both alike), and must end in the
same state. Figures are the mean time per step (churn amortised) and the median step.

1. One table (256 slots, 16,384 blocks): jitted steps, waited for, vs the Python allocator.
2. Many tables: 8 nodes, each a table of 8 layer groups over one pool (8 x the blocks), in one
   jitted, vmapped step vs 8 Python allocators of 8 groups.
3. Fused: a jitted decode-like step of the ``tiny`` model geometry (KV written through the slot
   mapping, attention over the paged context) with the block-table update inside it vs the same
   step given precomputed tables; and the same for the lightest step (the KV write alone).

Usage: ``python experiments/bench/block_table.py [--quick] [--out FILE.md]``.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import _report  # beside this script
from symphony_jax.config import model_preset
from symphony_jax.memory import block_table as bt
from symphony_jax.memory.py_allocator import PyBlockAllocator

i32 = jnp.int32


@dataclasses.dataclass(frozen=True)
class Workload:
    num_slots: int = 256
    num_blocks: int = 16_384
    block_size: int = 16
    max_blocks_per_seq: int = 48  # 768 tokens: longest prompt plus every step
    steps: int = 400
    warmup: int = 16  # two churn periods: every step kind has compiled
    churn_every: int = 8
    churn: int = 8
    min_prompt: int = 64
    max_prompt: int = 512


QUICK = Workload(num_slots=16, num_blocks=512, max_blocks_per_seq=8, steps=12, warmup=4,
                 churn_every=2, churn=2, min_prompt=8, max_prompt=64)


@dataclasses.dataclass(frozen=True)
class Schedule:
    prompts: np.ndarray  # i32[S]       first prompt of every slot
    churn_slots: dict[int, np.ndarray]  # step -> i32[C]  slots that finish and restart
    churn_prompts: dict[int, np.ndarray]  # step -> i32[C]  their new prompts


def make_schedule(w: Workload, seed: int) -> Schedule:
    rng = np.random.default_rng(seed)
    prompt = lambda n: rng.integers(w.min_prompt, w.max_prompt + 1, n, dtype=np.int32)
    churn_steps = range(w.churn_every, w.steps, w.churn_every)
    slots = {i: rng.choice(w.num_slots, w.churn, replace=False).astype(np.int32)
             for i in churn_steps}
    return Schedule(prompt(w.num_slots), slots, {i: prompt(w.churn) for i in churn_steps})


def decode_step(table: bt.BlockTable) -> bt.BlockTable:
    """Grow every sequence by one token."""
    S = table.num_slots
    return bt.reserve(table, jnp.arange(S, dtype=i32), jnp.ones(S, i32), max_new_blocks=1)[0]


def churn_step(table: bt.BlockTable, slots, prompts) -> bt.BlockTable:
    """Finish the sequences in ``slots``, start new prompts there, then decode."""
    table = bt.free(table, slots)
    return decode_step(bt.allocate(table, slots, prompts)[0])


def churn_inputs(schedules: list[Schedule], stacked: bool) -> dict[int, tuple[jax.Array, ...]]:
    """Each churn step's inputs as device arrays, made before timing: slicing a device array
    eagerly costs more than the step being timed."""
    pick = np.stack if stacked else (lambda per_node: per_node[0])
    return {i: (jnp.asarray(pick([s.churn_slots[i] for s in schedules])),
                jnp.asarray(pick([s.churn_prompts[i] for s in schedules])))
            for i in schedules[0].churn_slots}


class JaxDriver:
    """Steps one table, or a stack of tables (vmapped), through the churn schedule."""

    def __init__(self, table: bt.BlockTable, inputs: dict[int, tuple[jax.Array, ...]],
                 stacked: bool):
        wrap = jax.vmap if stacked else (lambda f: f)
        self.table, self.inputs = table, inputs
        self.decode = jax.jit(wrap(decode_step), donate_argnums=0)
        self.churn = jax.jit(wrap(churn_step), donate_argnums=0)

    def __call__(self, i: int):
        self.table = (self.churn(self.table, *self.inputs[i]) if i in self.inputs
                      else self.decode(self.table))
        return self.table


def python_driver(allocators: list[PyBlockAllocator],
                  schedules: list[Schedule]) -> Callable[[int], None]:
    """Steps allocator k through schedule k, like ``JaxDriver``."""
    S = allocators[0].num_slots
    slots, ones = list(range(S)), [1] * S
    churn = {i: [(s.churn_slots[i].tolist(), s.churn_prompts[i].tolist()) for s in schedules]
             for i in schedules[0].churn_slots}

    def step(i: int) -> None:
        for k, allocator in enumerate(allocators):
            if i in churn:
                finished, prompts = churn[i][k]
                allocator.free(finished)
                allocator.allocate(finished, prompts)
            allocator.reserve(slots, ones, 1)

    return step


def time_interleaved(w: Workload, **steps: Callable[[int], object]) -> dict[str, np.ndarray]:
    """Seconds of each timed step of each driver; drivers alternate step by step."""
    times = {name: [] for name in steps}
    for i in range(w.steps):
        for name, step in steps.items():
            start = time.perf_counter()
            jax.block_until_ready(step(i))
            if i >= w.warmup:
                times[name].append(time.perf_counter() - start)
    return {name: np.array(t) for name, t in times.items()}


def new_table(w: Workload, num_groups: int = 1) -> bt.BlockTable:
    """A table of ``num_groups`` layer groups, its pool ``num_blocks`` blocks per group."""
    return bt.create(w.num_slots, w.num_blocks * num_groups, w.max_blocks_per_seq, w.block_size,
                     num_groups)


def new_allocator(w: Workload, schedule: Schedule, num_groups: int) -> PyBlockAllocator:
    allocator = PyBlockAllocator(w.num_slots, w.num_blocks * num_groups, w.max_blocks_per_seq,
                                 w.block_size, num_groups)
    assert all(allocator.allocate(range(w.num_slots), schedule.prompts.tolist()))
    return allocator


def bench_tables(w: Workload, nodes: int, groups: int) -> dict[str, np.ndarray]:
    """``nodes`` tables of ``groups`` layer groups, each node with its own schedule."""
    schedules = [make_schedule(w, seed=node) for node in range(nodes)]
    start = lambda t, p: bt.allocate(t, jnp.arange(w.num_slots), p)[0]
    if nodes == 1:
        tables = start(new_table(w, groups), schedules[0].prompts)
    else:
        stacked = jax.tree.map(lambda *x: jnp.stack(x), *[new_table(w, groups)] * nodes)
        tables = jax.jit(jax.vmap(start))(stacked, np.stack([s.prompts for s in schedules]))
    jitted = JaxDriver(tables, churn_inputs(schedules, nodes > 1), stacked=nodes > 1)
    allocators = [new_allocator(w, s, groups) for s in schedules]
    times = time_interleaved(w, jitted=jitted, python=python_driver(allocators, schedules))
    tokens = np.asarray(jitted.table.num_tokens).reshape(nodes, groups, w.num_slots)
    assert tokens.tolist() == [a.tokens for a in allocators], "the workloads diverged"
    free = np.asarray(jitted.table.free_top).reshape(-1)
    assert free.tolist() == [a.num_free_blocks for a in allocators], "the workloads diverged"
    return times


def init_params(key, num_layers: int, hidden: int, kv_width: int, q_width: int, ffn: int):
    shapes = dict(wq=(hidden, q_width), wk=(hidden, kv_width), wv=(hidden, kv_width),
                  wo=(q_width, hidden), w1=(hidden, ffn), w2=(ffn, hidden))
    keys = jax.random.split(key, len(shapes))
    return {name: 0.05 * jax.random.normal(k, (num_layers, *shape), jnp.float32)
            for k, (name, shape) in zip(keys, shapes.items())}


def decode_like_step(params, pool, x, block_ids, lengths, mapping, *, attend: bool,
                     block_size: int, num_kv_heads: int):
    """One decode token per sequence through every layer of a small model over a paged pool.

    ``pool: f32[L, 2, NB * block_size, KVH * D]``; K and V of the new tokens are written
    through ``mapping`` (dropped where out of range). With ``attend``, each sequence's context
    is gathered through its table row and attended to (grouped-query, masked by length).
    """
    S, MB = block_ids.shape
    positions = jnp.arange(MB * block_size)
    for layer in range(pool.shape[0]):
        p = jax.tree.map(lambda w: w[layer], params)
        q, k, v = x @ p["wq"], x @ p["wk"], x @ p["wv"]
        pool = pool.at[layer, :, mapping].set(jnp.stack([k, v], axis=1), mode="drop")
        if attend:
            kv = pool[layer].reshape(2, -1, block_size, k.shape[-1])[:, block_ids]
            kv = kv.reshape(2, S, MB * block_size, num_kv_heads, -1)
            qh = q.reshape(S, num_kv_heads, -1, kv.shape[-1])
            scores = jnp.einsum("shgd,sthd->shgt", qh, kv[0]) / np.sqrt(kv.shape[-1])
            scores = jnp.where(positions < lengths[:, None, None, None], scores, -jnp.inf)
            out = jnp.einsum("shgt,sthd->shgd", jax.nn.softmax(scores, axis=-1), kv[1])
            x = x + out.reshape(S, -1) @ p["wo"]
        x = x + jax.nn.relu(x @ p["w1"]) @ p["w2"]
    return pool, x


def step_metadata(table: bt.BlockTable):
    """What the model step reads from the table: block ids, lengths, new tokens' KV slots."""
    lengths = table.num_tokens[0]
    mapping = bt.slot_mapping(table, jnp.arange(table.num_slots, dtype=i32), lengths - 1)[0]
    return table.block_ids[0], lengths, mapping


def bench_fused(w: Workload, attend: bool) -> dict[str, np.ndarray]:
    """The decode-like step with the table update inside vs given the update's results."""
    model = model_preset("tiny")
    kv_width = model.num_kv_heads * model.head_dim
    params = init_params(jax.random.key(0), model.num_layers, model.hidden_size, kv_width,
                         model.num_heads * model.head_dim, model.intermediate_size)
    x = jax.random.normal(jax.random.key(1), (w.num_slots, model.hidden_size), jnp.float32)

    def model_step(pool, block_ids, lengths, mapping):
        return decode_like_step(params, pool, x, block_ids, lengths, mapping, attend=attend,
                                block_size=w.block_size, num_kv_heads=model.num_kv_heads)

    schedule = make_schedule(w, seed=0)
    inputs = churn_inputs([schedule], stacked=False)
    first = lambda: bt.allocate(new_table(w), jnp.arange(w.num_slots), schedule.prompts)[0]

    # The update's results, step by step, for the step that is given them.
    table, given = first(), []
    for i in range(w.steps):
        table = churn_step(table, *inputs[i]) if i in inputs else decode_step(table)
        given.append(step_metadata(table))

    def updating(table, pool, *churn):
        table = churn_step(table, *churn) if churn else decode_step(table)
        pool, y = model_step(pool, *step_metadata(table))
        return table, pool, y

    pool_shape = (model.num_layers, 2, w.num_blocks * w.block_size, kv_width)
    with_update = jax.jit(updating, donate_argnums=(0, 1))
    without = jax.jit(model_step, donate_argnums=0)
    state = dict(table=first(), pool=jnp.zeros(pool_shape, jnp.float32),
                 given_pool=jnp.zeros(pool_shape, jnp.float32))

    def run_with_update(i):
        state["table"], state["pool"], y = with_update(state["table"], state["pool"],
                                                        *inputs.get(i, ()))
        return y

    def run_without(i):
        state["given_pool"], y = without(state["given_pool"], *given[i])
        return y

    return time_interleaved(w, with_update=run_with_update, without=run_without)


def report(w: Workload, attention_steps: int) -> str:
    one, many = bench_tables(w, nodes=1, groups=1), bench_tables(w, nodes=8, groups=8)
    fused = {"attention": bench_fused(dataclasses.replace(w, steps=attention_steps), True),
             "KV write only": bench_fused(w, False)}
    us = lambda s: f"{s * 1e6:,.1f} us"
    lines = [
        f"JAX {jax.__version__} on {jax.devices()[0].platform} ({_report.machine()}), "
        f"{datetime.date.today()}. {w.num_slots} slots, "
        f"{w.num_blocks} blocks of {w.block_size} per table; {w.churn} sequences restart every "
        f"{w.churn_every} steps. Mean per step (churn amortised) and median step, after "
        f"{w.warmup} warm-up steps.",
        "",
        "| tables | jitted mean | python mean | python / jitted | jitted median | python median |",
        "|---|---|---|---|---|---|",
    ]
    for name, t in (("1", one), ("8 of 8 layer groups (8 nodes, vmap)", many)):
        lines.append(f"| {name} | {us(t['jitted'].mean())} | {us(t['python'].mean())} | "
                     f"{t['python'].mean() / t['jitted'].mean():.2f}x | "
                     f"{us(np.median(t['jitted']))} | {us(np.median(t['python']))} |")
    lines += ["", "| decode-like step (tiny model, 256 sequences) | without update | "
              "with update | added |", "|---|---|---|---|"]
    for name, t in fused.items():
        added = t["with_update"].mean() / t["without"].mean() - 1
        lines.append(f"| {name} | {us(t['without'].mean())} | {us(t['with_update'].mean())} | "
                     f"{added:+.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    return _report.main(__file__, __doc__, lambda quick: report(
        QUICK if quick else Workload(), attention_steps=QUICK.steps if quick else 64), argv)


if __name__ == "__main__":
    main()
