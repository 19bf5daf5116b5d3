"""Speculative decoding: which sequences speculate, the n-gram proposer, and the verification of
proposed tokens against the target model's logits (greedy match or rejection sampling).

One speculative step of a sequence holding L tokens (L - 1 of them with K/V in the cache): a
proposer offers k <= K draft tokens d_1..d_k; the target runs the last real token and the drafts
as one chunk of k + 1 query tokens through the paged cache (the prefill path with cached context)
and returns k + 1 rows of logits, row j predicting the token after d_1..d_j. `verify` accepts the
longest agreeing prefix d_1..d_a and adds one more token from row a (the correction on a reject,
the bonus token when all k are accepted), so a step emits a + 1 tokens. The K/V slots of rejected
drafts are dropped by the scheduler (block_manager.truncate); only full blocks of accepted tokens
are ever hashed into the prefix cache.

Greedy rows: accept while d_j is the argmax of row j - 1; the extra token is the argmax of row a.
The output is the one non-speculative greedy decoding gives (up to float ties: the k + 1 rows
come from the chunked-prefill attention instead of the decode kernel).

Sampled rows (standard rejection sampling): p_j = the distribution the sampler would draw from
(native/reference.py target_probs: temperature, top-k, top-p), q_j = the proposer's distribution
(a one-hot on d_j for n-gram proposals; the draft model's own p for draft proposals). d_j is
accepted with probability min(1, p_j(d_j) / q_j(d_j)); on a reject the extra token is drawn from
norm(max(0, p_j - q_j)); after k accepts, from p_k. Every emitted token is then distributed as the
target's sampling would draw it. Uniforms come from the sequence's own generator (one per accept
test, one for the extra token), so a row never depends on the rest of the batch; the tokens of a
seed differ from non-speculative sampling's (they consume the generator differently).

Not speculated (they decode one token a step, in the same batch): beam search, encoder-decoder
models, and requests whose logits processing depends on the tokens before each position:
repetition / presence / frequency penalties, bad words, EOS masked by min_new_tokens (until
min_new_tokens are generated), structured-output grammars (the mask of each verified position) and
top_log_probs (the sampler lists alternatives for one position a step)."""

from __future__ import annotations

from array import array

import torch

from native import reference
from worker.engine.sequence import Sequence

NGRAM_MAX = 3  # longest suffix the n-gram proposer matches
NGRAM_MIN = 2  # shortest (a single repeated token predicts little and costs a verification)
METHODS = ("ngram", "draft")


def speculable(seq: Sequence) -> bool:
    """Whether `seq` may take draft tokens this step (see the module docstring)."""
    s = seq.sampling
    return (seq.beam is None and seq.encoder_ids is None and s.num_beams == 1
            and s.repetition_penalty == 1.0 and not s.presence_penalty and not s.frequency_penalty
            and not s.bad_word_token_sequences
            and not s.grammar  # structured output: the mask would be needed at every verified position
            and not s.top_log_probs  # alternatives are drawn by the sampler, one position per step
            and (not s.eos_token_ids or seq.num_generated >= s.min_new_tokens))


def ngram_propose(tokens: list[int], k: int, max_n: int = NGRAM_MAX, min_n: int = NGRAM_MIN) -> list[int]:
    """Prompt lookup: the k tokens that follow the latest earlier occurrence of the last n tokens of
    `tokens` (prompt and output), for the longest n in [min_n, max_n] that occurs; [] when none
    does. A match that runs into the end continues periodically (a loop of period p proposes its
    next k tokens, not only the p it has seen)."""
    L = len(tokens)
    if k < 1 or L < min_n + 1:
        return []
    hay = array("q", tokens).tobytes()
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        needle = hay[(L - n) * 8:]
        end = (L - 1) * 8  # a match must end before the last token, so one token at least follows it
        while True:
            at = hay.rfind(needle, 0, end)
            if at < 0:
                break
            if at % 8 == 0:  # tokens[i:i + n] equals the suffix: continue from i + n
                i, out = at // 8, []
                for j in range(i + n, i + n + k):  # past the end, the match repeats with period L - n - i
                    out.append(tokens[j] if j < L else out[j - L])
                return out
            end = at + len(needle) - 1  # misaligned (inside a token): look further left
    return []


class NgramProposer:
    """Prompt lookup / n-gram proposals: no model, no state."""

    def propose(self, seqs: list[Sequence], ks: list[int]) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        return [ngram_propose(s.token_ids, k) for s, k in zip(seqs, ks)], [None] * len(seqs)


def _sampling_params(seqs: list[Sequence], repeats: list[int]):
    """Per-row temperature, top_k, top_p tensors (host), each sequence's values repeated."""
    rep = lambda f: [f(s.sampling) for s, r in zip(seqs, repeats) for _ in range(r)]  # noqa: E731
    return (torch.tensor(rep(lambda p: p.temperature), dtype=torch.float32, device="cpu"),
            torch.tensor(rep(lambda p: p.top_k), dtype=torch.int64, device="cpu"),
            torch.tensor(rep(lambda p: p.top_p), dtype=torch.float32, device="cpu"))


def sampling_probs(logits: torch.Tensor, seqs: list[Sequence], repeats: list[int]) -> torch.Tensor:
    """logits [R, V] (sum(repeats) rows; sequence i's rows consecutive) -> [R, V] float64 host
    probabilities each row samples from (target_probs with the sequence's parameters)."""
    return reference.target_probs(logits, *_sampling_params(seqs, repeats))


def _uniform(g: torch.Generator | None) -> float:
    return float(torch.rand((), generator=g, dtype=torch.float64, device="cpu"))  # generators live on the host


def draw(p: torch.Tensor, u: float) -> int:
    """The token of p [V] (float64, non-negative) at cumulative mass u * total (inverse CDF)."""
    cum = torch.cumsum(p, 0)
    i = int(torch.searchsorted(cum, torch.tensor([u * float(cum[-1])], dtype=cum.dtype, device=cum.device),
                                     right=True)[0])
    if i >= p.numel():  # u * total rounded up to the total: the last token with mass
        i = int(torch.nonzero(p > 0)[-1])
    return i


def rejection_sample(p: torch.Tensor, drafts: list[int], q: torch.Tensor | None,
                     g: torch.Generator | None) -> tuple[list[int], int]:
    """p [k+1, V] float64: the target's distributions; drafts: d_1..d_k; q [k, V]: the proposer's
    distributions (None: one-hot on the drafts). Returns (the tokens to emit, drafts accepted)."""
    out = []
    for j, d in enumerate(drafts):
        qd = 1.0 if q is None else float(q[j, d])
        pd = float(p[j, d])
        if qd > 0 and _uniform(g) * qd < pd:  # accept with probability min(1, p/q)
            out.append(d)
            continue
        if q is None:
            residual = p[j].clone()
            residual[d] = 0.0
        else:
            residual = (p[j] - q[j]).clamp(min=0.0)
        if float(residual.sum()) <= 0.0:  # p <= q everywhere up to rounding: p itself
            residual = p[j]
        out.append(draw(residual, _uniform(g)))
        return out, j
    out.append(draw(p[len(drafts)], _uniform(g)))
    return out, len(drafts)


def verify(logits: torch.Tensor, seqs: list[Sequence], drafts: list[list[int]],
           draft_probs: list[torch.Tensor | None]) -> tuple[list[list[int]], list[list[float]], list[int]]:
    """logits: [sum(k_i + 1), V] fp32, sequence i's k_i + 1 rows consecutive (row j: after its
    first j drafts). Returns per sequence (tokens to append: accepted drafts then one more, their
    log-probs under the target's distribution, drafts accepted). Greedy rows: one argmax and
    log-softmax over all of them, one host sync; sampled rows: float64 on the host."""
    repeats = [len(d) + 1 for d in drafts]
    starts, at = [], 0
    for r in repeats:
        starts.append(at)
        at += r
    greedy = [i for i, s in enumerate(seqs) if s.sampling.greedy]
    drawn = [i for i, s in enumerate(seqs) if not s.sampling.greedy]
    tokens: list[list[int]] = [[] for _ in seqs]
    logprobs: list[list[float]] = [[] for _ in seqs]
    accepted = [0] * len(seqs)
    if greedy:
        rows = torch.tensor([starts[i] + j for i in greedy for j in range(repeats[i])], dtype=torch.long,
                            device=logits.device)
        x = logits[rows]  # [G, V]
        best = torch.argmax(x, -1)
        lp = torch.log_softmax(x, -1).gather(1, best[:, None])[:, 0]
        host = torch.stack([best.to(torch.float64), lp.to(torch.float64)]).tolist()
        at = 0
        for i in greedy:
            r = repeats[i]
            best_i, lp_i = [int(t) for t in host[0][at:at + r]], host[1][at:at + r]
            at += r
            a = 0
            while a < len(drafts[i]) and drafts[i][a] == best_i[a]:
                a += 1
            tokens[i], logprobs[i], accepted[i] = best_i[:a + 1], lp_i[:a + 1], a
    if drawn:
        rows = torch.tensor([starts[i] + j for i in drawn for j in range(repeats[i])], dtype=torch.long,
                            device=logits.device)
        p = sampling_probs(logits[rows], [seqs[i] for i in drawn], [repeats[i] for i in drawn])
        at = 0
        for i in drawn:
            r, seq = repeats[i], seqs[i]
            p_i = p[at:at + r]
            at += r
            toks, accepted[i] = rejection_sample(p_i, drafts[i], draft_probs[i], seq.generator)
            tokens[i] = toks
            if seq.sampling.return_log_probs:
                logprobs[i] = [float(torch.log(p_i[j, t])) for j, t in enumerate(toks)]
            else:
                logprobs[i] = [0.0] * len(toks)
    return tokens, logprobs, accepted
