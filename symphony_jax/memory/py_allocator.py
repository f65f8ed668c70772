"""A block allocator in plain Python, of the usual design of Python engines.

A free list used as a stack, a list of reference counts, and per layer group a block list and
a token count per sequence slot; the groups share the free list and the counts. It implements
the batch semantics of ``block_table``: validity is judged on the state before the call,
requests are granted whole (in every group asked for, or none) in batch order while their
blocks fit, failed requests change nothing. It is the reference model of the block-table tests
and the Python baseline of ``experiments/bench/block_table.py``, so ``reserve`` — the per-step
hot path — is one tight pass.

``groups`` arguments are a list of G bools (default: every group); results are one flag per
request, True when it was granted in the groups asked for. Token counts are one per request,
or (``reserve``) a list of G such lists, one per group.
"""

from __future__ import annotations


class PyBlockAllocator:
    def __init__(self, num_slots: int, num_blocks: int, max_blocks_per_seq: int,
                 block_size: int, num_groups: int = 1):
        self.num_slots, self.num_blocks, self.block_size = num_slots, num_blocks, block_size
        self.max_blocks_per_seq, self.num_groups = max_blocks_per_seq, num_groups
        self.free_list = list(range(num_blocks - 1, 0, -1))  # pop() hands out low ids first
        self.ref_counts = [0] * num_blocks
        # blocks[g][slot], tokens[g][slot]: each group's rows
        self.blocks = [[[] for _ in range(num_slots)] for _ in range(num_groups)]
        self.tokens = [[0] * num_slots for _ in range(num_groups)]

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_list)

    def _asked(self, groups) -> list[int]:
        return list(range(self.num_groups)) if groups is None else [
            g for g, on in enumerate(groups) if on]

    def _append(self, slots, num_new, max_new_blocks, require_empty, groups) -> list[bool]:
        # One pass suffices: slots are deduplicated, so no request sees another's effect, and
        # granted blocks never exceed the running total of needs checked against `available`.
        bs, limit = self.block_size, self.max_blocks_per_seq * self.block_size
        width = max_new_blocks or self.max_blocks_per_seq
        asked = self._asked(groups)
        tokens, blocks, free_list, ref_counts = self.tokens, self.blocks, self.free_list, \
            self.ref_counts
        available, total, seen, ok = len(free_list), 0, set(), []
        per_group = len(num_new) > 0 and isinstance(num_new[0], (list, tuple))
        for i, slot in enumerate(slots):
            if not 0 <= slot < self.num_slots or slot in seen or not asked:
                ok.append(False)
                continue
            seen.add(slot)
            need = 0
            for g in asked:  # checked in every group before anything is taken
                n, old = num_new[g][i] if per_group else num_new[i], tokens[g][slot]
                more = -(-(old + n) // bs) + (-old // bs)
                if n < 0 or old + n > limit or more > width or (require_empty and old):
                    break
                need += more
            else:
                total += need
                if not need or total <= available:
                    for g in asked:
                        n, old = num_new[g][i] if per_group else num_new[i], tokens[g][slot]
                        row = blocks[g][slot]
                        for _ in range(-(-(old + n) // bs) + (-old // bs)):
                            block = free_list.pop()
                            ref_counts[block] = 1
                            row.append(block)
                        tokens[g][slot] = old + n
                    ok.append(True)
                    continue
            ok.append(False)
        return ok

    def allocate(self, slots, num_tokens, max_new_blocks: int | None = None,
                 groups=None) -> list[bool]:
        return self._append(slots, num_tokens, max_new_blocks, require_empty=True, groups=groups)

    def reserve(self, slots, num_new_tokens, max_new_blocks: int | None = None,
                groups=None) -> list[bool]:
        return self._append(slots, num_new_tokens, max_new_blocks, require_empty=False,
                            groups=groups)

    def _first_valid(self, slots) -> list[bool]:
        seen, valid = set(), []
        for slot in slots:
            valid.append(0 <= slot < self.num_slots and slot not in seen)
            seen.add(slot)
        return valid

    def free(self, slots, groups=None) -> None:
        for slot, valid in zip(slots, self._first_valid(slots)):
            if not valid:
                continue
            for g in self._asked(groups):
                for block in self.blocks[g][slot]:
                    self.ref_counts[block] -= 1
                    if self.ref_counts[block] == 0:
                        self.free_list.append(block)
                self.blocks[g][slot], self.tokens[g][slot] = [], 0

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
        """Empty slots of group 0 take already referenced blocks as their first, full, blocks
        (one group only: groups never share a block)."""
        assert self.num_groups == 1, "adopt needs a one-group allocator"
        ok, rows, tokens = [], self.blocks[0], self.tokens[0]
        for slot, row, count, valid in zip(slots, blocks, counts, self._first_valid(slots)):
            taken = list(row[:count]) if 0 <= count <= self.max_blocks_per_seq else None
            good = (valid and tokens[slot] == 0 and taken is not None
                    and all(0 < b < self.num_blocks and self.ref_counts[b] > 0 for b in taken))
            ok.append(good)
            if good:
                for block in taken:
                    self.ref_counts[block] += 1
                rows[slot], tokens[slot] = taken, count * self.block_size
        return ok

    def fork(self, src, dst, groups=None) -> tuple[list[bool], list[tuple[int, int, int]]]:
        """Returns the ok flags and the (group, src block, dst block) triples to copy."""
        bs, asked = self.block_size, self._asked(groups)
        # Judge every fork on the state before the call: a destination may be another's source.
        lengths = [[self.tokens[g][s] if 0 <= s < self.num_slots else 0 for g in asked]
                   for s in src]
        rows = [[list(self.blocks[g][s]) if 0 <= s < self.num_slots else [] for g in asked]
                for s in src]
        valid = [v and bool(asked) and all(length > 0 and self.tokens[g][d] == 0
                                           for g, length in zip(asked, lens))
                 for d, lens, v in zip(dst, lengths, self._first_valid(dst))]
        available, total, ok, copies = len(self.free_list), 0, [], []
        for d, lens, group_rows, is_valid in zip(dst, lengths, rows, valid):
            partial = sum(length % bs != 0 for length in lens)
            total += partial if is_valid else 0
            granted = is_valid and (not partial or total <= available)
            ok.append(granted)
            if not granted:
                continue
            for g, length, row in zip(asked, lens, group_rows):
                shared = row[: length // bs]
                for block in shared:
                    self.ref_counts[block] += 1
                self.blocks[g][d], self.tokens[g][d] = list(shared), length
                if length % bs:
                    block = self.free_list.pop()
                    self.ref_counts[block] = 1
                    self.blocks[g][d].append(block)
                    copies.append((g, row[-1], block))
        return ok, copies

    def slot_mapping(self, slots, positions) -> list[list[int]]:
        """Each group's flat KV slot of each token (``num_blocks * block_size``: none)."""
        out, bs = [[] for _ in range(self.num_groups)], self.block_size
        for g, mapping in enumerate(out):
            for slot, position in zip(slots, positions):
                if 0 <= slot < self.num_slots and 0 <= position < self.tokens[g][slot]:
                    block = self.blocks[g][slot][position // bs]
                    mapping.append(block * bs + position % bs)
                else:
                    mapping.append(self.num_blocks * bs)
        return out

    def can_allocate(self, num_tokens, groups=None) -> list[bool]:
        limit, available, total, ok = self.max_blocks_per_seq * self.block_size, \
            len(self.free_list), 0, []
        width = len(self._asked(groups))
        for n in num_tokens:
            need = -(-n // self.block_size) * width
            valid = 0 <= n <= limit and width > 0
            total += need if valid else 0
            ok.append(valid and (need == 0 or total <= available))
        return ok
