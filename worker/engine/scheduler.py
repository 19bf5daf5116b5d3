"""Continuous batching: which sequences run in the next step, and how many tokens each.

A *unit* is what is scheduled, preempted and admitted as one: a plain request's sequence, or all
beams of a beam-search request (they must be sampled in the same step). Units sit contiguously
in `running` / `waiting`.

Guarantees of `schedule()`:
- running units come first, in arrival order; each gets its next chunk (1 token when decoding,
  up to the remaining budget when a prompt is still being prefilled);
- waiting units are admitted in arrival order while the step has token budget, the batch has
  rows left (max_batch_size; a beam request holds num_beams rows from admission on) and their
  blocks fit; a long prompt is prefilled in chunks, so it never holds shorter requests back for
  more than one chunk;
- when blocks run out, the latest-arrived running unit is preempted (blocks freed, its tokens
  recomputed later), never failed;
- every scheduled sequence has blocks for all tokens it will hold after the step;
- a beam group with several beams is scheduled whole and every beam reaches its last token in the
  step (so all are sampled together); it may overrun the token budget by < num_beams x block_size
  tokens. A preempted group recomputes its common prefix once (first beam, chunked), then its
  other beams share those blocks again.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from worker.config import WorkerConfig
from worker.engine.block_manager import BlockManager
from worker.engine.sequence import Finish, Sequence, Status


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = WorkerConfig.max_batch_size  # rows (sequences, beams) in one step
    max_batch_tokens: int = WorkerConfig.max_batch_tokens  # tokens in one step (prefill chunks + decodes)


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


def _common_prefix(lists: list[list[int]]) -> int:
    n = 0
    for column in zip(*lists):
        if any(t != column[0] for t in column):
            break
        n += 1
    return n


def unit_of(seq: Sequence) -> list[Sequence]:
    """The sequences scheduled together with `seq` (its beam group's live beams, or itself)."""
    return [seq] if seq.beam is None else list(seq.beam.beams)


def width_of(unit: list[Sequence]) -> int:
    """Batch rows a unit holds: a beam request reserves num_beams rows before it forks."""
    return max(len(unit), unit[0].sampling.num_beams) if unit[0].beam is not None else len(unit)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager):
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        if seq.sampling.num_beams > 1 and seq.beam is None:
            from worker.engine.beam import BeamGroup

            BeamGroup.attach(seq)
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def rows(self) -> int:
        """Rows the running units hold."""
        n, i = 0, 0
        while i < len(self.running):
            unit = unit_of(self.running[i])
            n += width_of(unit)
            i += len(unit)
        return n

    def _preempt(self, unit: list[Sequence]) -> None:
        for seq in reversed(unit):
            self.running.remove(seq)
            self.blocks.release(seq)
            seq.num_computed = 0
            seq.status = Status.WAITING
            self.waiting.appendleft(seq)
        self.preemptions += 1

    def _chunks(self, unit: list[Sequence], budget: int) -> list[int]:
        if len(unit) == 1:
            return [min(unit[0].num_uncomputed, budget)]
        lead = unit[0]
        if any(s.num_computed == 0 and not s.block_table for s in unit[1:]):
            # a preempted beam group: the first beam recomputes the common prefix (in chunks) and the
            # others then share its full blocks again, so a group never needs more blocks than it held
            common = _common_prefix([s.token_ids for s in unit])
            shared = min(common, min(len(s.token_ids) for s in unit) - 1) // self.blocks.block_size
            shared *= self.blocks.block_size
            if lead.num_computed < shared:
                return [min(shared - lead.num_computed, budget)] + [0] * (len(unit) - 1)
            for s in unit[1:]:
                if s.num_computed == 0 and not s.block_table:
                    s.num_computed = self.blocks.fork(lead, s, shared)
        return [s.num_uncomputed for s in unit]  # several beams: all reach their last token together

    def _blocks_needed(self, unit: list[Sequence], chunks: list[int]) -> int:
        return sum(self.blocks.blocks_needed(s, s.num_computed + n) for s, n in zip(unit, chunks))

    def _take(self, batch: ScheduledBatch, unit: list[Sequence], chunks: list[int]) -> int:
        for s, n in zip(unit, chunks):
            if n == 0:
                continue
            self.blocks.allocate(s, s.num_computed + n)
            batch.seqs.append(s)
            batch.num_tokens.append(n)
        return sum(chunks)

    def schedule(self) -> ScheduledBatch:
        budget = self.config.max_batch_tokens
        batch = ScheduledBatch([], [])
        i = 0
        while i < len(self.running) and budget > 0:
            unit = unit_of(self.running[i])
            chunks = self._chunks(unit, budget)
            preempted_self = False
            while self._blocks_needed(unit, chunks) > self.blocks.num_free:
                victim = unit_of(self.running[-1])
                self._preempt(victim)
                if victim[0] is unit[0]:
                    preempted_self = True
                    break
            if preempted_self:
                break
            budget -= self._take(batch, unit, chunks)
            i += len(unit)
        rows = self.rows()
        while self.waiting and budget > 0:
            unit = unit_of(self.waiting[0])
            if rows + width_of(unit) > self.config.max_batch_size and self.running:
                break
            chunks = self._chunks(unit, budget)
            if self._blocks_needed(unit, chunks) > self.blocks.num_free:
                break
            for s in unit:
                self.waiting.remove(s)
                s.status = Status.RUNNING
                self.running.append(s)
            rows += width_of(unit)
            budget -= self._take(batch, unit, chunks)
        return batch

    def replace_beams(self, old: list[Sequence], new: list[Sequence]) -> None:
        """A beam group's running beams change (beam search reordered them): `new` takes the place of
        `old` in `running`; beams in `old` but not in `new` are dropped (blocks freed)."""
        at = self.running.index(old[0])
        keep = {id(s) for s in new}
        for s in old:
            self.running.remove(s)
            if id(s) not in keep:
                self.blocks.release(s)
                s.status = Status.FINISHED
        for k, s in enumerate(new):
            s.status = Status.RUNNING
            self.running.insert(at + k, s)

    def _remove(self, seq: Sequence) -> None:
        if seq.status is Status.FINISHED:
            return
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.FINISHED

    def finish(self, seq: Sequence, reason: Finish) -> None:
        """Remove a sequence (with a beam request: all its beams) wherever it is and free its blocks
        (idempotent)."""
        for s in unit_of(seq) + [seq]:
            self._remove(s)
        seq.finish = reason
