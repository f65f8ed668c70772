"""Sequences stepped through the paged forward by hand: the block table, a layout, the model."""

import numpy as np

from symphony_jax.config import CacheConfig, ModelConfig
from symphony_jax.memory import block_table as bt
from symphony_jax.memory import kv_cache, layout
from symphony_jax.model import llama


class PagedRun:
    """Up to ``slots`` sequences of up to ``width * block_size`` tokens, run a batch of
    (slot, tokens) at a time in fixed shapes (``tokens`` per mixed step, ``slots`` per decode
    step) so that each step kind compiles once."""

    def __init__(self, params, config: ModelConfig, *, slots=4, blocks=48, block_size=8,
                 width=8, tokens=128, layer_groups=None):
        self.params, self.config, self.slots, self.tokens = params, config, slots, tokens
        self.groups = layer_groups or (0,) * config.num_layers
        num_groups = max(self.groups) + 1  # the pool holds ``blocks`` blocks for every group
        self.table = bt.create(slots, blocks * num_groups, width, block_size, num_groups)
        self.pool = kv_cache.create(config, CacheConfig(
            block_size=block_size, num_device_blocks=blocks * num_groups,
            num_layer_groups=num_groups))

    def step(self, batch: list[tuple[int, np.ndarray]], decode: bool = False,
             all_logits: bool = False) -> np.ndarray:
        """Float64 logits of each sequence's last token (of every token with ``all_logits``)."""
        slots = np.full(self.slots, self.slots, np.int32)
        lens = np.zeros(self.slots, np.int32)
        ids = np.zeros(self.slots if decode else self.tokens, np.int32)
        start = 0
        for i, (slot, tokens) in enumerate(batch):
            slots[i], lens[i] = slot, len(tokens)
            ids[start:start + len(tokens)] = tokens
            start += len(tokens)
        self.table, ok = bt.reserve(self.table, slots, lens)
        assert np.asarray(ok)[:, : len(batch)].all()
        step_layout = layout.build(self.table, slots, lens, num_tokens=len(ids))
        out, self.pool = llama.forward(self.params, self.pool, ids, step_layout,
                                       config=self.config, layer_groups=self.groups,
                                       decode=decode, all_logits=all_logits)
        out = np.asarray(out, np.float64)
        return out[:start] if all_logits else out[: len(batch)]

    def greedy(self, slot: int, prompt: np.ndarray, steps: int) -> tuple[list[int], list]:
        """Greedy continuation of ``prompt`` in ``slot``: the tokens and each step's logits."""
        logits = [self.step([(slot, np.asarray(prompt, np.int32))])[0]]
        tokens = [int(np.argmax(logits[-1]))]
        for _ in range(steps - 1):
            logits.append(self.step([(slot, np.asarray(tokens[-1:], np.int32))], decode=True)[0])
            tokens.append(int(np.argmax(logits[-1])))
        return tokens, logits
