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
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from worker.engine.sampler import NEG_INF, TokenCounts, process
from worker.engine.sequence import Finish, Sequence

NEG = -1.0e9  # HF's "impossible" score


@dataclass
class Hypothesis:
    score: float  # length-normalised
    tokens: list[int]  # generated tokens
    log_probs: list[float]  # per generated token (processed log-softmax)
    reason: Finish


@dataclass(eq=False)
class BeamGroup:
    """The beams of one request. Invariant: `beams` are all running or all waiting, contiguous in the
    scheduler's queue, and `scores[i]` / `log_probs[i]` belong to `beams[i]`."""

    handle: Sequence
    beams: list[Sequence] = field(default_factory=list)
    scores: list[float] = field(default_factory=lambda: [0.0])  # running sum of log-probs per beam
    log_probs: list[list[float]] = field(default_factory=lambda: [[]])
    finished: list[Hypothesis] = field(default_factory=list)  # best first, at most num_beams
    improvable: bool = True  # HF's early-stop heuristic not yet satisfied
    done: bool = False
    _emit: Callable = field(default=None, repr=False)

    def __post_init__(self):
        self.beams = self.beams or [self.handle]
        self._emit = self._emit or self.handle.emit

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

    def k(self) -> int:
        """Continuations drawn per step: max(2, 1 + #eos) x num_beams (HF)."""
        s = self.handle.sampling
        return max(2, 1 + len(s.eos_token_ids)) * s.num_beams

    def step(self, cands: list[tuple[int, int, float]], cand_lps: list[float], scheduler, finish,
             max_model_len: int) -> None:
        """cands: this step's top continuations (beam, token, accumulated score), best first, with
        the processed log-prob of each token (`candidates`). Either ends the request through
        `finish(handle, reason, tokens, log_probs)` or reorders the beams in the scheduler."""
        s = self.handle.sampling
        nb, lp_pow = s.num_beams, s.length_penalty
        ends = [self._ends(self.beams[b], tok, max_model_len) for b, tok, _ in cands]
        generated = self.beams[0].num_generated + 1  # after this token
        if self.improvable:
            for rank, ((b, tok, score), reason) in enumerate(zip(cands, ends)):
                if reason is not None and rank < nb:
                    lps = self.log_probs[b] + [cand_lps[rank]]
                    self.finished.append(Hypothesis(score / generated ** lp_pow,
                                                    self.beams[b].generated + [tok], lps, reason))
            self.finished.sort(key=lambda h: -h.score)  # stable: earlier hypotheses win ties
            del self.finished[nb:]
        running = sorted(range(len(cands)), key=lambda r: -(cands[r][2] + (NEG if ends[r] else 0.0)))[:nb]
        best_running = cands[running[0]][2] + (NEG if ends[running[0]] else 0.0)
        if self.improvable and len(self.finished) == nb:
            self.improvable = best_running / generated ** lp_pow > self.finished[-1].score
        if not self.improvable or all(r is not None for r in ends):
            self._end(finish, cands[running[0]], cand_lps[running[0]])
            return
        self._reorder(scheduler, [cands[r] for r in running], [cand_lps[r] for r in running])

    def _end(self, finish, top: tuple[int, int, float], top_lp: float) -> None:
        if self.finished:
            best = self.finished[0]
        else:  # cannot happen with HF's rules (the last step finishes num_beams); keep the best beam
            b, tok, _ = top
            best = Hypothesis(0.0, self.beams[b].generated + [tok], self.log_probs[b] + [top_lp], Finish.LENGTH)
        self.handle.cum_log_prob = float(sum(best.log_probs))
        finish(self.handle, best.reason, best.tokens, best.log_probs)

    def _reorder(self, scheduler, chosen: list[tuple[int, int, float]], chosen_lps: list[float]) -> None:
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
        self.log_probs = [self.log_probs[b] + [lp] for (b, _, _), lp in zip(chosen, chosen_lps)]
        self.scores = [score for _, _, score in chosen]
        self.beams = new
        scheduler.replace_beams(old, new)


def candidates(groups: list[BeamGroup], logits: torch.Tensor, counts: TokenCounts | None = None
               ) -> list[tuple[list[tuple[int, int, float]], list[float]]]:
    """logits: [R, V], the groups' beams' rows in group order -> per group (its top k
    continuations (beam, token, accumulated score) best first, each token's processed log-prob).

    Scores are log_softmax(logits) with the request's processors applied (sampler.process) plus
    the beam's running score; all groups without a diversity rate pick from one topk over
    [groups, max beams x V] (missing beams padded with -inf). One host sync."""
    dev, V = logits.device, logits.shape[1]
    beams = [b for g in groups for b in g.beams]
    logp = process(torch.log_softmax(logits.float(), -1), beams, counts)  # [R, V]
    scores = torch.tensor([x for g in groups for x in g.scores], dtype=logp.dtype, device=dev)
    acc = torch.cat([logp + scores[:, None], torch.full((1, V), NEG_INF, dtype=logp.dtype, device=dev)])
    starts, at = [], 0
    for g in groups:
        starts.append(at)
        at += len(g.beams)
    ks = [min(g.k(), len(g.beams) * V) for g in groups]
    plain = [i for i, g in enumerate(groups) if g.handle.sampling.beam_search_diversity_rate == 0.0]
    picks: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # group -> (score, beam, token)
    if plain:
        width = max(len(groups[i].beams) for i in plain)
        rows = [[starts[i] + b if b < len(groups[i].beams) else at for b in range(width)] for i in plain]
        flat = acc[torch.tensor(rows, dtype=torch.long, device=dev)].reshape(len(plain), width * V)
        vals, idx = torch.topk(flat, max(ks[i] for i in plain), dim=1)  # [G, kmax]
        for j, i in enumerate(plain):
            picks[i] = (vals[j, :ks[i]], idx[j, :ks[i]] // V, idx[j, :ks[i]] % V)
    for i, g in enumerate(groups):
        if i in picks:
            continue
        rate, nb = g.handle.sampling.beam_search_diversity_rate, len(g.beams)
        vals, idx = torch.topk(acc[starts[i]:starts[i] + nb], min(ks[i], V), dim=1)  # [beams, k]
        rank = torch.arange(vals.shape[1], dtype=vals.dtype, device=dev)
        order = torch.topk((vals - rate * rank).reshape(-1), ks[i]).indices
        picks[i] = (vals.reshape(-1)[order], order // vals.shape[1], idx.reshape(-1)[order])
    parts = []
    for i in range(len(groups)):
        v, b, t = picks[i]
        lp = logp[starts[i] + b, t]
        parts.append(torch.stack([v.double(), b.double(), t.double(), lp.double()]))
    host = torch.cat(parts, dim=1).tolist()  # the one sync
    out, at = [], 0
    for k in ks:
        v, b, t, lp = (col[at:at + k] for col in host)
        out.append(([(int(bb), int(tt), vv) for vv, bb, tt in zip(v, b, t)], lp))
        at += k
    return out


def beam_step(sampled: list[Sequence], logits: torch.Tensor, scheduler, finish, max_model_len: int,
              counts: TokenCounts | None = None):
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
    order = list(groups.values())
    rows = [row_of[id(b)] for g in order for b in g.beams]  # the scheduler samples a group's beams together
    dev = logits.device
    picked = candidates(order, logits[torch.tensor(rows, dtype=torch.long, device=dev)], counts)
    for group, (cands, lps) in zip(order, picked):
        group.step(cands, lps, scheduler, finish, max_model_len)
    if len(rest) == len(sampled):
        return sampled, logits
    return [sampled[i] for i in rest], logits[torch.tensor(rest, dtype=torch.long, device=dev)]
