"""Continuous batching: which sequences run in the next step, and how many tokens each.

A *unit* is what is scheduled, preempted and admitted as one: a plain request's sequence, or all
beams of a beam-search request (they must be sampled in the same step). Units sit contiguously
in `running` / `waiting`.

Policy (throughput and time to first token together): decodes first, then prefill chunks within
a per-step prompt-token budget (`prefill_budget`, PREFILL_BUDGET = 512 by default). Every stream
already generating gets its token in every step, so a wave of new prompts never stalls the
running streams behind one huge prefill step, and new prompts are prefilled a few at a time in
arrival order, so the first of them see their first token after one short step instead of after
all of them (on the 32-stream bench, prompt ~128, all 32 prompts used to prefill in the first
steps before any stream saw a token).

The budget, tuned on that workload (`python -m bench.streams --budgets 4096,1024,512,256,128`, 300M
Llama fp32, 32 streams, distinct prompts of 128, 128 new tokens, 2-core AMX Xeon): tokens/s 123.4 /
135.0 / 132.4 / 130.1 / 128.2, TTFT p50 11.9 / 5.8 / 5.4 / 5.3 / 5.7 s, p99 11.9 / 9.4 / 9.9 / 10.4 /
11.7 s. 512 sits between 1024 (throughput, p99) and 256 (p50); a prefill of 4096 tokens at once starves
every decode for its whole step.

Guarantees of `schedule()`:
- running units past their prompt (decodes) come first, in arrival order, one token each (a
  forked beam group: its beams' last tokens), within max_batch_tokens;
- then prompt chunks, at most min(prefill_budget, tokens left) in all: first running units still
  prefilling (in arrival order), then waiting units admitted in arrival order while the batch has
  rows left (max_batch_size; a beam request holds num_beams rows from admission on) and their
  blocks fit; a long prompt is prefilled in chunks, so it never holds shorter requests back for
  more than one chunk;
- when blocks run out for a decode, the latest-arrived running unit is preempted (blocks freed,
  its tokens recomputed later), never failed; a prefill chunk preempts only in a step where
  nothing else runs (otherwise it waits for the decodes to free blocks);
- every scheduled sequence has blocks for all tokens it will hold after the step;
- a beam group with several beams is scheduled whole and every beam reaches its last token in the
  step (so all are sampled together); it may overrun the token budget by < num_beams x block_size
  tokens. A preempted group recomputes its common prefix once (first beam, chunked), then its
  other beams share those blocks again;
- speculative decoding (num_speculative_tokens > 0): last, decodes of sequences that may speculate
  (worker/engine/speculative.py `speculable`) get up to K lookahead slots each (`lookahead`), from
  the tokens and free blocks left after everything above: speculation never delays a decode or a
  prefill, nor preempts. The engine fills them with proposals (`set_drafts`) before the step runs.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from worker.config import WorkerConfig
from worker.engine import constraints
from worker.engine.block_manager import BlockManager
from worker.engine.sequence import Finish, Sequence, Status
from worker.engine.speculative import speculable

PREFILL_BUDGET = 512  # prompt tokens per step (see the module docstring)


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = WorkerConfig.max_batch_size  # rows (sequences, beams) in one step
    max_batch_tokens: int = WorkerConfig.max_batch_tokens  # tokens in one step (prefill chunks + decodes)


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_tokens: list[int]  # this step's tokens, per sequence (with speculation: 1 + its drafts)
    lookahead: list[int] = field(default_factory=list)  # draft slots reserved per sequence (0: none)
    drafts: list[list[int]] = field(default_factory=list)  # proposed tokens per sequence ([]: none)
    draft_probs: list = field(default_factory=list)  # per sequence: the proposer's [k, V] probabilities or None

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def draft_lists(self) -> list[list[int]]:
        return self.drafts or [[] for _ in self.seqs]

    def samples(self) -> list[bool]:
        """Whether each sequence gets a new token this step (its chunk reaches its last token)."""
        return [s.num_computed + n - len(d) == len(s.token_ids)
                for s, n, d in zip(self.seqs, self.num_tokens, self.draft_lists())]

    def set_drafts(self, drafts: list[list[int]], probs: list) -> None:
        """The proposals for the rows with lookahead (in row order; at most their lookahead each):
        each such row's chunk becomes its last token plus its drafts."""
        self.drafts = [[] for _ in self.seqs]
        self.draft_probs = [None] * len(self.seqs)
        rows = [i for i, k in enumerate(self.lookahead) if k]
        for i, d, q in zip(rows, drafts, probs):
            d = list(d[:self.lookahead[i]])
            self.drafts[i] = d
            self.draft_probs[i] = None if q is None or not d else q[:len(d)]
            self.num_tokens[i] = 1 + len(d)
            self.lookahead[i] = len(d)


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
    def __init__(self, config: SchedulerConfig, blocks: BlockManager, max_model_len: int = 1 << 30,
                 prefill_budget: int = PREFILL_BUDGET, num_speculative_tokens: int = 0):
        self.config = config
        self.blocks = blocks
        self.prefill_budget = prefill_budget  # prompt tokens per step, after the decodes
        self.max_model_len = max_model_len  # a sequence ends (LENGTH) when it holds this many tokens
        self.num_speculative_tokens = num_speculative_tokens  # K: lookahead slots per decode (0 = off)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.spec_proposed = 0  # draft tokens verified (counters for EngineStats)
        self.spec_accepted = 0  # of them accepted

    def add(self, seq: Sequence) -> None:
        if seq.sampling.num_beams > 1 and seq.beam is None:
            from worker.engine.beam import BeamGroup

            BeamGroup.attach(seq)
        seq.status = Status.WAITING
        self.waiting.append(seq)

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

    def _shared(self, unit: list[Sequence]) -> int:
        """Tokens in the full blocks a beam group's beams have in common (one token left each)."""
        common = _common_prefix([s.token_ids for s in unit])
        shared = min(common, min(len(s.token_ids) for s in unit) - 1) // self.blocks.block_size
        return shared * self.blocks.block_size

    def _chunks(self, unit: list[Sequence], budget: int) -> list[int]:
        if len(unit) == 1:
            return [min(unit[0].num_uncomputed, budget)]
        lead = unit[0]
        if any(s.num_computed == 0 and not s.block_table for s in unit[1:]):
            # a preempted beam group: the first beam recomputes the common prefix (in chunks) and the
            # others then share its full blocks again, so a group never needs more blocks than it held
            shared = self._shared(unit)
            if lead.num_computed < shared:
                return [min(shared - lead.num_computed, budget)] + [0] * (len(unit) - 1)
            for s in unit[1:]:
                if s.num_computed == 0 and not s.block_table:
                    s.num_computed = self.blocks.fork(lead, s, shared)
        return [s.num_uncomputed for s in unit]  # several beams: all reach their last token together

    def _admit(self, unit: list[Sequence], budget: int) -> list[int] | None:
        """A waiting unit's first chunks if its blocks fit (None: it waits). A unit holding no blocks
        (new or preempted) first takes its cached prefix (block_manager.reuse) through its lead, so
        only the rest is prefilled; a preempted beam group reuses at most its beams' shared full
        blocks, which the other beams then share again (`_chunks`). Undone when it does not fit."""
        lead = unit[0]
        fresh = all(not s.block_table and s.num_computed == 0 for s in unit)
        if fresh:
            limit = len(lead.token_ids) if len(unit) == 1 else self._shared(unit)
            lead.num_computed = self.blocks.reuse(lead, limit)
        chunks = self._chunks(unit, budget)
        if self._blocks_needed(unit, chunks) <= self.blocks.num_free:
            return chunks
        if fresh:
            self.blocks.unreuse(lead)
            for s in unit[1:]:
                self.blocks.release(s)
                s.num_computed = 0
        return None

    def _blocks_needed(self, unit: list[Sequence], chunks: list[int]) -> int:
        return sum(self.blocks.blocks_needed(s, s.num_computed + n) for s, n in zip(unit, chunks))

    def _take(self, batch: ScheduledBatch, unit: list[Sequence], chunks: list[int]) -> int:
        for s, n in zip(unit, chunks):
            if n == 0:
                continue
            self.blocks.allocate(s, s.num_computed + n)
            batch.seqs.append(s)
            batch.num_tokens.append(n)
            batch.lookahead.append(0)
        return sum(chunks)

    def _speculate(self, batch: ScheduledBatch, budget: int) -> None:
        """Lookahead slots for the batch's speculable decodes, in order, from the `budget` tokens and
        the free blocks left (never preempting)."""
        K = self.num_speculative_tokens
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_tokens)):
            if budget <= 0:
                return
            if n != 1 or seq.num_uncomputed != 1 or not speculable(seq):
                continue
            s = seq.sampling
            k = min(K, budget, self.max_model_len - len(seq.token_ids), s.max_new_tokens - seq.num_generated - 1)
            while k > 0 and self.blocks.blocks_needed(seq, seq.num_computed + 1 + k) > self.blocks.num_free:
                k -= 1
            if k <= 0:
                continue
            self.blocks.allocate(seq, seq.num_computed + 1 + k)
            batch.num_tokens[i] = 1 + k
            batch.lookahead[i] = k
            budget -= k

    def set_drafts(self, batch: ScheduledBatch, drafts: list[list[int]], probs: list) -> None:
        """The proposals for the batch's rows with lookahead (ScheduledBatch.set_drafts); the blocks of
        the slots left empty are freed again."""
        rows = [i for i, k in enumerate(batch.lookahead) if k]
        batch.set_drafts(drafts, probs)
        for i in rows:
            seq = batch.seqs[i]
            self.blocks.truncate(seq, seq.num_computed + batch.num_tokens[i])

    def _decoding(self, unit: list[Sequence]) -> bool:
        """A unit past its prompt: one token per sequence, or a forked beam group (its beams
        recompute at most a partial block each)."""
        if all(s.num_uncomputed == 1 for s in unit):
            return True
        return (unit[0].beam is not None and unit[0].num_generated > 0
                and all(s.num_computed > 0 and s.num_uncomputed <= self.blocks.block_size for s in unit))

    def _fit(self, unit: list[Sequence], chunks: list[int], may_preempt: bool) -> bool:
        """Make the unit's blocks fit, preempting the latest-arrived running units if allowed;
        False when it does not fit (or preempted itself)."""
        while self._blocks_needed(unit, chunks) > self.blocks.num_free:
            if not may_preempt:
                return False
            victim = unit_of(self.running[-1])
            self._preempt(victim)
            if victim[0] is unit[0]:
                return False
        return True

    def schedule(self) -> ScheduledBatch:
        budget = self.config.max_batch_tokens
        batch = ScheduledBatch([], [])
        # 1. decodes: every running unit past its prompt, in arrival order
        i = 0
        while i < len(self.running) and budget > 0:
            unit = unit_of(self.running[i])
            if not self._decoding(unit):
                i += len(unit)
                continue
            chunks = self._chunks(unit, budget)
            if not self._fit(unit, chunks, may_preempt=True):
                break
            budget -= self._take(batch, unit, chunks)
            i += len(unit)
        # 2. prefill chunks within the prefill budget: running units still prefilling, then admissions
        prefill = min(budget, self.prefill_budget)
        i = 0
        while i < len(self.running) and prefill > 0:
            unit = unit_of(self.running[i])
            if self._decoding(unit):  # scheduled in pass 1
                i += len(unit)
                continue
            chunks = self._chunks(unit, prefill)
            # preempt for a prefill only when nothing else runs (no decode will ever free blocks)
            if not self._fit(unit, chunks, may_preempt=not batch.seqs):
                break
            prefill -= self._take(batch, unit, chunks)
            i += len(unit)
        rows = self.rows()
        while self.waiting and prefill > 0:
            unit = unit_of(self.waiting[0])
            if rows + width_of(unit) > self.config.max_batch_size and self.running:
                break
            chunks = self._admit(unit, prefill)
            if chunks is None:
                break
            for s in unit:
                self.waiting.remove(s)
                s.status = Status.RUNNING
                self.running.append(s)
            rows += width_of(unit)
            prefill -= self._take(batch, unit, chunks)
        if self.num_speculative_tokens:
            self._speculate(batch, self.config.max_batch_tokens - batch.total_tokens)
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

    # ---- after the model ran a batch -----------------------------------------------------------
    def postprocess(self, batch: ScheduledBatch, logits: torch.Tensor, sampler, finish: Callable) -> int:
        """The step's results: advance every scheduled sequence by its chunk, sample the rows that
        reached their last token (`logits` [S, V], one row each, in batch order): beam groups
        through beam_step, the others through `sampler` (worker.engine.sampler.Sampler); append,
        check the stop conditions, emit. `finish(seq, reason, new_tokens, log_probs)` ends a
        request (it must call `self.finish`). Returns the output tokens produced (one per beam
        request stepped)."""
        from worker.engine.beam import beam_step

        samples, drafts = batch.samples(), batch.draft_lists()
        sampled = [s for s, ok in zip(batch.seqs, samples) if ok]
        now = time.monotonic()
        for seq, n, d in zip(batch.seqs, batch.num_tokens, drafts):
            seq.num_computed += n - len(d)  # drafts count once accepted (_accept_drafts)
            self.blocks.commit(seq)  # its newly full blocks join the prefix cache
            if seq.first_scheduled is None:
                seq.first_scheduled = now
        spec = None
        if any(drafts):  # speculating rows have 1 + drafts logits rows each: verified apart
            plain, spec_rows, spec = [], [], ([], [], [])
            at = 0
            for seq, ok, d, q in zip(batch.seqs, samples, drafts, batch.draft_probs):
                if not ok:
                    continue
                if d:
                    spec_rows.extend(range(at, at + 1 + len(d)))
                    for part, v in zip(spec, (seq, d, q)):
                        part.append(v)
                    at += 1 + len(d)
                else:
                    plain.append(at)
                    at += 1
            index = lambda rows: torch.tensor(rows, dtype=torch.long, device=logits.device)  # noqa: E731
            spec = (*spec, logits[index(spec_rows)])
            sampled = [s for s, ok, d in zip(batch.seqs, samples, drafts) if ok and not d]
            logits = logits[index(plain)]
        produced = len({id(s.beam) for s in sampled if s.beam is not None})
        sampled, logits = beam_step(sampled, logits, self, finish, self.max_model_len, sampler.counts)
        tokens, logprobs = sampler(logits, sampled) if sampled else ([], [])
        for seq, tok, lp in zip(sampled, tokens, logprobs):
            seq.token_ids.append(tok)
            seq.cum_log_prob += lp
            produced += 1
            reason = self.stop_reason(seq, tok)
            if reason is None:
                seq.emit([tok], [lp], None, "")
            else:
                finish(seq, reason, [tok], [lp])
        if spec is not None:
            produced += self._accept_drafts(*spec, finish)
        return produced

    def _accept_drafts(self, seqs: list[Sequence], drafts: list[list[int]], probs: list, logits: torch.Tensor,
                       finish: Callable) -> int:
        """Verify the speculating rows (logits: 1 + drafts rows each), append what each accepts (up to
        a stop condition), drop the K/V slots of the rest; returns the tokens produced."""
        from worker.engine.speculative import verify

        tokens, logprobs, accepted = verify(logits, seqs, drafts, probs)
        produced = 0
        for seq, d, toks, lps, a in zip(seqs, drafts, tokens, logprobs, accepted):
            self.spec_proposed += len(d)
            self.spec_accepted += a
            reason, n = None, 0
            for tok, lp in zip(toks, lps):
                seq.token_ids.append(tok)
                seq.cum_log_prob += lp
                n += 1
                reason = self.stop_reason(seq, tok)
                if reason is not None:
                    break
            # the accepted drafts' K/V is in the cache (the last appended token's is not yet)
            seq.num_computed = len(seq.token_ids) - 1
            self.blocks.commit(seq)
            self.blocks.truncate(seq, seq.num_computed)
            produced += n
            if reason is None:
                seq.emit(toks[:n], lps[:n], None, "")
            else:
                finish(seq, reason, toks[:n], lps[:n])
        return produced

    def stop_reason(self, seq: Sequence, tok: int) -> Finish | None:
        """Why `seq` ends now that `tok` was appended (None: it goes on)."""
        s = seq.sampling
        if tok in s.eos_token_ids and seq.num_generated > s.min_new_tokens - 1:
            return Finish.EOS
        for stop in s.stop_token_sequences:
            if stop and seq.token_ids[-len(stop):] == list(stop):
                return Finish.STOP
        if constraints.done(seq):  # structured output complete
            return Finish.STOP
        if seq.num_generated >= s.max_new_tokens or len(seq.token_ids) >= self.max_model_len:
            return Finish.LENGTH
        return None
