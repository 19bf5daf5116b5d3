"""Continuous batching: which sequences run in the next step, and how many tokens each.

Guarantees of `schedule()`:
- running sequences come first, in arrival order; each gets its next chunk (1 token when
  decoding, up to the remaining budget when its prompt is still being prefilled);
- waiting sequences are admitted in arrival order while the step has token budget, the batch
  is below max_batch_size and their blocks fit; a long prompt is prefilled in chunks, so it
  never holds shorter requests back for more than one chunk;
- when blocks run out, the latest-arrived running sequence is preempted (blocks freed, its
  tokens recomputed later), never failed;
- every scheduled sequence has blocks for all tokens it will hold after the step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from worker.engine.block_manager import BlockManager
from worker.engine.sequence import Finish, Sequence, Status


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 32  # sequences in one step
    max_batch_tokens: int = 2048  # tokens in one step (prefill chunks + decodes)


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_tokens: list[int]  # this step's tokens, per sequence

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def samples(self) -> list[bool]:
        """Whether each sequence gets a new token this step (its chunk reaches its last token)."""
        return [s.num_computed + n == len(s.token_ids) for s, n in zip(self.seqs, self.num_tokens)]


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager):
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def schedule(self) -> ScheduledBatch:
        budget = self.config.max_batch_tokens
        batch = ScheduledBatch([], [])
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            while not self.blocks.can_allocate(seq, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.allocate(seq, seq.num_computed + n)
                batch.seqs.append(seq)
                batch.num_tokens.append(n)
                budget -= n
                i += 1
        while self.waiting and budget > 0 and len(self.running) < self.config.max_batch_size:
            seq = self.waiting[0]
            n = min(seq.num_uncomputed, budget)
            if not self.blocks.can_allocate(seq, seq.num_computed + n):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq, seq.num_computed + n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            budget -= n
        return batch

    def finish(self, seq: Sequence, reason: Finish) -> None:
        """Remove a sequence wherever it is and free its blocks (idempotent)."""
        if seq.status is Status.FINISHED:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.FINISHED
        seq.finish = reason
