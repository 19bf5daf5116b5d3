"""Fixed-size KV blocks: a free list and per-sequence block tables.

Invariant: every block id is either in the free list or referenced by sequences (ref_count > 0);
`num_free + used == num_blocks` at all times. Beams of one request share their full prompt blocks
(ref_count = number of beams holding it); a block still being written is held by one sequence only.
"""

from __future__ import annotations

from collections import deque

from worker.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free: deque[int] = deque(range(num_blocks))
        self.ref_count = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks `seq` needs so that `num_tokens` tokens fit."""
        need = -(-num_tokens // self.block_size)
        return max(0, need - len(seq.block_table))

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        n = self.blocks_needed(seq, num_tokens)
        if n > self.num_free:
            raise RuntimeError(f"out of KV blocks: need {n}, {self.num_free} free")
        for _ in range(n):
            b = self.free.popleft()
            self.ref_count[b] = 1
            seq.block_table.append(b)

    def fork(self, parent: Sequence, child: Sequence, num_tokens: int | None = None) -> int:
        """child shares the parent's blocks that are full within its first `num_tokens` tokens (default:
        all it has computed). A partly filled block is never shared: it is still written to, so the child
        recomputes those tokens into a block of its own. Returns how many tokens the child shares."""
        n = parent.num_computed if num_tokens is None else num_tokens
        full = min(n // self.block_size, len(parent.block_table))
        self.release(child)
        child.block_table = parent.block_table[:full]
        for b in child.block_table:
            self.ref_count[b] += 1
        return full * self.block_size

    def check(self, tables: list[list[int]]) -> None:
        """Invariant check for tests: `tables` (every live block table) hold exactly the used blocks."""
        counts = [0] * self.num_blocks
        for table in tables:
            for b in table:
                counts[b] += 1
        if counts != self.ref_count:
            raise AssertionError("block reference counts disagree with the live block tables")
        if sorted(self.free) != [b for b in range(self.num_blocks) if counts[b] == 0]:
            raise AssertionError("free list disagrees with the live block tables")

    def release(self, seq: Sequence) -> None:
        for b in seq.block_table:
            self.ref_count[b] -= 1
            if self.ref_count[b] == 0:
                self.free.append(b)
            elif self.ref_count[b] < 0:
                raise RuntimeError(f"block {b} released twice")
        seq.block_table = []
