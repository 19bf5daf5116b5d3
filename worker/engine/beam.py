"""Beam search inside the continuous batch.

A beam-search request enters the scheduler as one sequence (its *handle*); the prompt is
prefilled once. At its first sampled step it forks into num_beams beams that share the prompt's
full KV blocks (block_manager.fork); each later step reorders the beams: a parent's first child
continues in the parent's own sequence (keeping its partly filled last block), further children
share the parent's full blocks and recompute the few tokens of its partial block (< block_size)
instead of copying KV memory, so no copy kernel or extra broadcast exists across ranks.

The selection follows transformers' beam search (`_beam_search`, early_stopping=False):
- scores are log_softmax of the logits, then the request's processors (repetition penalty,
  min_new_tokens, bad words, presence/frequency) applied to those log-probs, as HF does;
- the top max(2, 1 + #eos) x num_beams continuations are drawn from all beams; those that end
  (eos, a stop sequence, max_new_tokens, the context) and rank within the first num_beams become
  finished hypotheses scored sum(log-probs) / generated_len ** length_penalty; the best num_beams
  unfinished continue;
- the search ends when every continuation ends, or when all num_beams finished slots are full and
  the best running beam, length-normalised at its current length, cannot beat the worst of them.
FasterTransformer differences we map: FT's beam_search_diversity_rate lowers the k-th ranked
continuation of each beam by rate * k before the global selection (scores keep the true log-probs);
FT's len_penalty default is 0 (no normalisation), HF's length_penalty default is 1; sampling
parameters (temperature, top_k, top_p, seed) are not used by beam search.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from worker.engine.sampler import apply_penalties
from worker.engine.sequence import Finish, Sequence

NEG = -1.0e9  # HF's "impossible" score


@dataclass
class Hypothesis:
    score: float  # length-normalised
    tokens: list[int]  # generated tokens
    log_probs: list[float]  # per generated token (processed log-softmax)
    reason: Finish


class BeamGroup:
    """The beams of one request. Invariant: `beams` are all running or all waiting, contiguous in the
    scheduler's queue, and `scores[i]` / `log_probs[i]` belong to `beams[i]`."""

    def __init__(self, handle: Sequence):
        self.handle = handle
        self.beams: list[Sequence] = [handle]
        self.scores: list[float] = [0.0]  # running sum of log-probs per beam
        self.log_probs: list[list[float]] = [[]]
        self.finished: list[Hypothesis] = []  # best first, at most num_beams
        self.improvable = True  # HF's early-stop heuristic not yet satisfied
        self._emit = handle.emit
        self.done = False

    @classmethod
    def attach(cls, seq: Sequence) -> BeamGroup:
        group = cls(seq)
        seq.beam = group
        seq.emit = group.emit
        return group

    def emit(self, tokens, log_probs, finish, error) -> None:
        """Every beam's emit: only the request's final message goes out, once."""
        if self.done or finish is None:
            return
        self.done = True
        self._emit(tokens, log_probs, finish, error)

    # ---- one step --------------------------------------------------------------------------------
    def _ends(self, seq: Sequence, tok: int, max_model_len: int) -> Finish | None:
        s = seq.sampling
        if tok in s.eos_token_ids:
            return Finish.EOS
        ids = seq.token_ids + [tok]
        for stop in s.stop_token_sequences:
            if stop and ids[-len(stop):] == list(stop):
                return Finish.STOP
        if seq.num_generated + 1 >= s.max_new_tokens or len(ids) >= max_model_len:
            return Finish.LENGTH
        return None

    def _candidates(self, scores: torch.Tensor, k: int) -> list[tuple[int, int, float]]:
        """scores: [beams, V] accumulated log-probs -> top k (beam, token, score), best first."""
        rate = self.handle.sampling.beam_search_diversity_rate
        vocab = scores.shape[1]
        if rate == 0.0:
            vals, idx = torch.topk(scores.reshape(-1), k)
            return [(int(i) // vocab, int(i) % vocab, float(v)) for v, i in zip(vals, idx)]
        vals, idx = torch.topk(scores, min(k, vocab), dim=1)  # [beams, k]
        adjusted = vals - rate * torch.arange(vals.shape[1], dtype=vals.dtype)
        order = torch.topk(adjusted.reshape(-1), k).indices
        kk = vals.shape[1]
        return [(int(o) // kk, int(idx.view(-1)[o]), float(vals.view(-1)[o])) for o in order]

    def step(self, logits: torch.Tensor, scheduler, finish, max_model_len: int) -> None:
        """logits: [len(beams), V] fp32, row i for beams[i]. Either ends the request through
        `finish(handle, reason, tokens, log_probs)` or reorders the beams in the scheduler."""
        s = self.handle.sampling
        nb, lp_pow = s.num_beams, s.length_penalty
        rows = []
        for beam, row in zip(self.beams, logits):
            rows.append(apply_penalties(torch.log_softmax(row.float(), -1), beam))
        logp = torch.stack(rows)  # [beams, V] processed log-probs
        acc = logp + torch.tensor(self.scores, dtype=logp.dtype)[:, None]
        k = min(max(2, 1 + len(s.eos_token_ids)) * nb, acc.numel())
        cands = self._candidates(acc, k)
        ends = [self._ends(self.beams[b], tok, max_model_len) for b, tok, _ in cands]
        generated = self.beams[0].num_generated + 1  # after this token
        if self.improvable:
            for rank, ((b, tok, score), reason) in enumerate(zip(cands, ends)):
                if reason is not None and rank < nb:
                    lps = self.log_probs[b] + [float(logp[b, tok])]
                    self.finished.append(Hypothesis(score / generated ** lp_pow,
                                                    self.beams[b].generated + [tok], lps, reason))
            self.finished.sort(key=lambda h: -h.score)  # stable: earlier hypotheses win ties
            del self.finished[nb:]
        running = sorted(range(len(cands)), key=lambda r: -(cands[r][2] + (NEG if ends[r] else 0.0)))[:nb]
        best_running = cands[running[0]][2] + (NEG if ends[running[0]] else 0.0)
        if self.improvable and len(self.finished) == nb:
            self.improvable = best_running / generated ** lp_pow > self.finished[-1].score
        if not self.improvable or all(r is not None for r in ends):
            self._end(finish, running, cands, logp)
            return
        self._reorder(scheduler, [cands[r] for r in running], logp)

    def _end(self, finish, running, cands, logp) -> None:
        if self.finished:
            best = self.finished[0]
        else:  # cannot happen with HF's rules (the last step finishes num_beams); keep the best beam
            b, tok, _ = cands[running[0]]
            best = Hypothesis(0.0, self.beams[b].generated + [tok], self.log_probs[b] + [float(logp[b, tok])],
                              Finish.LENGTH)
        self.handle.cum_log_prob = float(sum(best.log_probs))
        finish(self.handle, best.reason, best.tokens, best.log_probs)

    def _reorder(self, scheduler, chosen: list[tuple[int, int, float]], logp: torch.Tensor) -> None:
        old = list(self.beams)
        tokens = [old[b].token_ids + [tok] for b, tok, _ in chosen]  # before any parent is touched
        taken: set[int] = set()
        new: list[Sequence] = []
        for (b, _, _), ids in zip(chosen, tokens):
            parent = old[b]
            if b not in taken:  # the first child continues in the parent's own sequence and blocks
                taken.add(b)
                parent.token_ids = ids
                new.append(parent)
            else:
                child = dataclasses.replace(parent, token_ids=ids, block_table=[], num_computed=0)
                child.num_computed = scheduler.blocks.fork(parent, child, parent.num_computed)
                new.append(child)
        self.log_probs = [self.log_probs[b] + [float(logp[b, tok])] for b, tok, _ in chosen]
        self.scores = [score for _, _, score in chosen]
        self.beams = new
        scheduler.replace_beams(old, new)


def beam_step(sampled: list[Sequence], logits: torch.Tensor, scheduler, finish, max_model_len: int):
    """Take the beam-search rows out of a step's sampled rows and advance their groups.
    Returns the other sequences and their logits rows, for the ordinary sampler."""
    groups: dict[int, BeamGroup] = {}
    rest = []
    for i, seq in enumerate(sampled):
        if seq.beam is None:
            rest.append(i)
        else:
            groups[id(seq.beam)] = seq.beam
    if not groups:
        return sampled, logits
    row_of = {id(seq): i for i, seq in enumerate(sampled)}
    for group in groups.values():
        rows = [row_of[id(b)] for b in group.beams]  # the scheduler samples a group's beams together
        group.step(logits[rows], scheduler, finish, max_model_len)
    return [sampled[i] for i in rest], logits[rest]
