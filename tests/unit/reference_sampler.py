"""The per-row sampler and beam candidate selection as they were before batching: the reference the
batched processors in worker/engine/sampler.py and beam.py are checked against (tests only)."""

from __future__ import annotations

import torch

from native import ops
from worker.engine.sequence import Sequence


def apply_penalties(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """logits: [V] fp32 for one sequence (modified in place and returned)."""
    s = seq.sampling
    if s.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / s.repetition_penalty, vals * s.repetition_penalty)
    if (s.presence_penalty or s.frequency_penalty) and seq.num_generated:
        gen = torch.tensor(seq.generated, dtype=torch.long)
        counts = torch.bincount(gen, minlength=logits.numel())[: logits.numel()].to(logits.dtype)
        logits -= s.frequency_penalty * counts + s.presence_penalty * (counts > 0).to(logits.dtype)
    if seq.num_generated < s.min_new_tokens and s.eos_token_ids:
        logits[list(s.eos_token_ids)] = float("-inf")
    for bad in s.bad_word_token_sequences:
        prefix = list(bad[:-1])
        if not prefix or seq.token_ids[-len(prefix):] == prefix:
            logits[bad[-1]] = float("-inf")
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits: [V] (already temperature-scaled); tokens outside top-k / nucleus set to -inf."""
    if top_k and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
        sorted_logits[drop] = float("-inf")
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    return logits


def needs_processing(seq: Sequence) -> bool:
    """Whether apply_penalties would change this sequence's logits now."""
    s = seq.sampling
    return (s.repetition_penalty != 1.0 or bool(s.bad_word_token_sequences)
            or ((s.presence_penalty or s.frequency_penalty) and seq.num_generated > 0)
            or (seq.num_generated < s.min_new_tokens and bool(s.eos_token_ids)))


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[float]]:
    """logits: [B, V] fp32, one row per sequence -> (token per row, its log-prob).

    Greedy rows take argmax (vectorised when no processor applies: argmax and log_softmax are
    per-row reductions). Sampled rows go through one batched top-k/top-p call (native/ops: the
    kernel where built, its float64 torch twin otherwise; the same tokens either way), each row
    drawing one uniform from its own generator. Their log-prob (under the top-k/top-p filtered
    distribution) is computed only for requests that return log-probs; 0.0 otherwise."""
    plain = [i for i, s in enumerate(seqs) if s.sampling.greedy and not needs_processing(s)]
    tokens: list[int] = [0] * len(seqs)
    logprobs: list[float] = [0.0] * len(seqs)
    if plain:
        rows = logits[plain] if len(plain) < len(seqs) else logits
        best = torch.argmax(rows, -1)  # [P]
        lps = torch.log_softmax(rows, -1).gather(1, best[:, None])[:, 0]
        for i, tok, lp in zip(plain, best.tolist(), lps.tolist()):
            tokens[i], logprobs[i] = tok, lp
    done = set(plain)
    drawn: list[tuple[int, torch.Tensor]] = []  # (row, processed logits [V]) of sampled rows
    for i, (row, seq) in enumerate(zip(logits, seqs)):
        if i in done:
            continue
        row = apply_penalties(row.clone(), seq) if needs_processing(seq) else row
        if seq.sampling.greedy:
            tok = int(torch.argmax(row))
            tokens[i], logprobs[i] = tok, float(torch.log_softmax(row, -1)[tok])
        else:
            drawn.append((i, row))
    if drawn:
        params = [seqs[i].sampling for i, _ in drawn]
        chosen = ops.sample_top_k_top_p(torch.stack([r for _, r in drawn]), [s.temperature for s in params],
                                        [s.top_k for s in params], [s.top_p for s in params],
                                        [seqs[i].generator for i, _ in drawn]).tolist()
        for (i, row), s, tok in zip(drawn, params, chosen):
            tokens[i] = tok
            if s.return_log_probs:
                kept = filter_top_k_top_p(row / s.temperature, s.top_k, s.top_p)  # keeps a superset of
                logprobs[i] = float(torch.log_softmax(kept, -1)[tok])  # the kernel's kept set: finite
    return tokens, logprobs


def beam_candidates(group, logits: torch.Tensor) -> tuple[list[tuple[int, int, float]], list[float]]:
    """The old BeamGroup.step selection: logits [len(beams), V] -> (top k (beam, token, score) best
    first, the processed log-prob of each candidate's token)."""
    s = group.handle.sampling
    rows = [apply_penalties(torch.log_softmax(row.float(), -1), beam) for beam, row in zip(group.beams, logits)]
    logp = torch.stack(rows)
    acc = logp + torch.tensor(group.scores, dtype=logp.dtype)[:, None]
    k = min(max(2, 1 + len(s.eos_token_ids)) * s.num_beams, acc.numel())
    rate = s.beam_search_diversity_rate
    vocab = acc.shape[1]
    if rate == 0.0:
        vals, idx = torch.topk(acc.reshape(-1), k)
        cands = [(int(i) // vocab, int(i) % vocab, float(v)) for v, i in zip(vals, idx)]
    else:
        vals, idx = torch.topk(acc, min(k, vocab), dim=1)
        adjusted = vals - rate * torch.arange(vals.shape[1], dtype=vals.dtype)
        order = torch.topk(adjusted.reshape(-1), k).indices
        kk = vals.shape[1]
        cands = [(int(o) // kk, int(idx.view(-1)[o]), float(vals.view(-1)[o])) for o in order]
    return cands, [float(logp[b, t]) for b, t, _ in cands]
