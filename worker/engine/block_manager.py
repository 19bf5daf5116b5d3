"""Fixed-size KV blocks: a free list and per-sequence block tables.

Invariant: every block id is either in the free list or referenced by sequences (ref_count > 0);
`num_free + used == num_blocks` at all times.
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

    def can_allocate(self, seq: Sequence, num_tokens: int, reserve: int = 0) -> bool:
        return self.blocks_needed(seq, num_tokens) + reserve <= self.num_free

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        n = self.blocks_needed(seq, num_tokens)
        if n > self.num_free:
            raise RuntimeError(f"out of KV blocks: need {n}, {self.num_free} free")
        for _ in range(n):
            b = self.free.popleft()
            self.ref_count[b] = 1
            seq.block_table.append(b)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """child shares parent's full blocks (copy-on-write is the caller's job for the last one)."""
        child.block_table = list(parent.block_table)
        for b in child.block_table:
            self.ref_count[b] += 1

    def release(self, seq: Sequence) -> None:
        for b in seq.block_table:
            self.ref_count[b] -= 1
            if self.ref_count[b] == 0:
                self.free.append(b)
            elif self.ref_count[b] < 0:
                raise RuntimeError(f"block {b} released twice")
        seq.block_table = []
