"""A block allocator in plain Python, of the usual design of Python engines.

A free list used as a stack, a block list and a token count per sequence slot, and a list of
reference counts. It implements the batch semantics of ``block_table`` (one layer group):
validity is judged on the state before the call, requests are granted in batch order while
their blocks fit, failed requests change nothing. It is the reference model of the block-table
tests and the Python baseline of ``experiments/bench/block_table.py``, so ``reserve`` — the
per-step hot path — is one tight pass.
"""

from __future__ import annotations


class PyBlockAllocator:
    def __init__(self, num_slots: int, num_blocks: int, max_blocks_per_seq: int,
                 block_size: int):
        self.num_slots, self.num_blocks, self.block_size = num_slots, num_blocks, block_size
        self.max_blocks_per_seq = max_blocks_per_seq
        self.free_list = list(range(num_blocks - 1, 0, -1))  # pop() hands out low ids first
        self.ref_counts = [0] * num_blocks
        self.blocks: list[list[int]] = [[] for _ in range(num_slots)]
        self.tokens = [0] * num_slots

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_list)

    def _append(self, slots, num_new, max_new_blocks, require_empty) -> list[bool]:
        # One pass suffices: slots are deduplicated, so no request sees another's effect, and
        # granted blocks never exceed the running total of needs checked against `available`.
        bs, limit = self.block_size, self.max_blocks_per_seq * self.block_size
        width = max_new_blocks or self.max_blocks_per_seq
        tokens, blocks, free_list, ref_counts = self.tokens, self.blocks, self.free_list, \
            self.ref_counts
        available, total, seen, ok = len(free_list), 0, set(), []
        for slot, n in zip(slots, num_new):
            if not 0 <= slot < self.num_slots or slot in seen:
                ok.append(False)
                continue
            seen.add(slot)
            old = tokens[slot]
            need = -(-(old + n) // bs) + (-old // bs)
            if n < 0 or old + n > limit or need > width or (require_empty and old):
                ok.append(False)
                continue
            total += need
            if need and total > available:
                ok.append(False)
                continue
            row = blocks[slot]
            for _ in range(need):
                block = free_list.pop()
                ref_counts[block] = 1
                row.append(block)
            tokens[slot] = old + n
            ok.append(True)
        return ok

    def allocate(self, slots, num_tokens, max_new_blocks: int | None = None) -> list[bool]:
        return self._append(slots, num_tokens, max_new_blocks, require_empty=True)

    def reserve(self, slots, num_new_tokens, max_new_blocks: int | None = None) -> list[bool]:
        return self._append(slots, num_new_tokens, max_new_blocks, require_empty=False)

    def _first_valid(self, slots) -> list[bool]:
        seen, valid = set(), []
        for slot in slots:
            valid.append(0 <= slot < self.num_slots and slot not in seen)
            seen.add(slot)
        return valid

    def free(self, slots) -> None:
        for slot, valid in zip(slots, self._first_valid(slots)):
            if not valid:
                continue
            for block in self.blocks[slot]:
                self.ref_counts[block] -= 1
                if self.ref_counts[block] == 0:
                    self.free_list.append(block)
            self.blocks[slot], self.tokens[slot] = [], 0

    def retain(self, blocks) -> None:
        for block in blocks:
            if 0 < block < self.num_blocks and self.ref_counts[block] > 0:
                self.ref_counts[block] += 1

    def release(self, blocks) -> None:
        for block in blocks:
            if 0 < block < self.num_blocks and self.ref_counts[block] > 0:
                self.ref_counts[block] -= 1
                if self.ref_counts[block] == 0:
                    self.free_list.append(block)

    def adopt(self, slots, blocks, counts) -> list[bool]:
        """Empty slots take already referenced blocks as their first, full, blocks."""
        ok = []
        for slot, row, count, valid in zip(slots, blocks, counts, self._first_valid(slots)):
            taken = list(row[:count]) if 0 <= count <= self.max_blocks_per_seq else None
            good = (valid and self.tokens[slot] == 0 and taken is not None
                    and all(0 < b < self.num_blocks and self.ref_counts[b] > 0 for b in taken))
            ok.append(good)
            if good:
                for block in taken:
                    self.ref_counts[block] += 1
                self.blocks[slot], self.tokens[slot] = taken, count * self.block_size
        return ok

    def fork(self, src, dst) -> tuple[list[bool], list[tuple[int, int]]]:
        """Returns the ok flags and the (src block, dst block) pairs to copy."""
        bs = self.block_size
        # Judge every fork on the state before the call: a destination may be another's source.
        lengths = [self.tokens[s] if 0 <= s < self.num_slots else 0 for s in src]
        rows = [list(self.blocks[s]) if 0 <= s < self.num_slots else [] for s in src]
        valid = [v and length > 0 and self.tokens[d] == 0
                 for d, length, v in zip(dst, lengths, self._first_valid(dst))]
        available, total, ok, copies = len(self.free_list), 0, [], []
        for d, length, row, is_valid in zip(dst, lengths, rows, valid):
            partial = length % bs != 0
            total += partial if is_valid else 0
            granted = is_valid and (not partial or total <= available)
            ok.append(granted)
            if not granted:
                continue
            shared = row[: length // bs]
            for block in shared:
                self.ref_counts[block] += 1
            self.blocks[d], self.tokens[d] = list(shared), length
            if partial:
                block = self.free_list.pop()
                self.ref_counts[block] = 1
                self.blocks[d].append(block)
                copies.append((row[-1], block))
        return ok, copies

    def slot_mapping(self, slots, positions) -> list[int]:
        out, bs = [], self.block_size
        for slot, position in zip(slots, positions):
            if 0 <= slot < self.num_slots and 0 <= position < self.tokens[slot]:
                out.append(self.blocks[slot][position // bs] * bs + position % bs)
            else:
                out.append(self.num_blocks * bs)
        return out

    def can_allocate(self, num_tokens) -> list[bool]:
        limit, available, total, ok = self.max_blocks_per_seq * self.block_size, \
            len(self.free_list), 0, []
        for n in num_tokens:
            need = -(-n // self.block_size)
            valid = 0 <= n <= limit
            total += need if valid else 0
            ok.append(valid and (need == 0 or total <= available))
        return ok
