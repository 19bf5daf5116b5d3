"""Logits processing and sampling for a whole step, as batched tensor ops on the logits' device.

One step: per-step parameter tensors ([P, 1] penalties, [S] temperature / top-k / top-p) built from
the sequences' host-side parameters, processors applied to all processed rows at once, one argmax /
log-softmax over the batch, one batched top-k/top-p call for the sampled rows, and one host sync
(`.tolist()` of tokens and log-probs together).

Token counts for the repetition / presence / frequency penalties live in `TokenCounts`, a [rows, V]
table on the logits' device kept across steps (as SGLang's penalizers): a sequence gets a row the
first time it is penalised (one scatter of its tokens) and afterwards only the tokens appended
since its last step are added, for all rows in one `index_put_`.

Batch invariance: a row's result never depends on the other rows. Processors and reductions work
row by row; each sampled row draws exactly one uniform from its own seeded generator (per-row
`torch.Generator`s, as before; native/ops `sample_top_k_top_p`), whatever else is in the batch.
"""

from __future__ import annotations

import torch

from native import ops
from worker.engine import constraints
from worker.engine.sequence import Sequence, Status

NEG_INF = float("-inf")


def _penalised(seq: Sequence) -> bool:
    s = seq.sampling
    return s.repetition_penalty != 1.0 or bool(s.presence_penalty) or bool(s.frequency_penalty)


class TokenCounts:
    """Per-sequence token statistics of the penalised sequences, on the logits' device.

    Row r of a sequence: seen[r] (bool [V]: the token is in its prompt or output) and gen[r]
    (fp32 [V]: times the token was generated). Rows of finished sequences are reused."""

    def __init__(self):
        self.entries: dict[int, list] = {}  # id(seq) -> [seq, row, tokens counted so far]
        self.free: list[int] = []
        self.seen: torch.Tensor | None = None  # [capacity, V] bool
        self.gen: torch.Tensor | None = None  # [capacity, V] fp32

    def _sweep(self) -> None:
        for key in [k for k, e in self.entries.items() if e[0].status is Status.FINISHED]:
            self.free.append(self.entries.pop(key)[1])

    def _grow(self, need: int, vocab: int, device: torch.device) -> None:
        have = 0 if self.gen is None else self.gen.shape[0]
        if self.gen is not None and (self.gen.shape[1] != vocab or self.gen.device.type != device.type):
            raise ValueError("TokenCounts used with logits of another vocabulary or device")
        if need <= len(self.free):
            return
        cap = max(8, 2 * have, have + need)
        seen = torch.zeros(cap, vocab, dtype=torch.bool, device=device)
        gen = torch.zeros(cap, vocab, dtype=torch.float32, device=device)
        if have:
            seen[:have] = self.seen
            gen[:have] = self.gen
        self.seen, self.gen = seen, gen
        self.free.extend(range(have, cap))

    def rows_for(self, seqs: list[Sequence], vocab: int, device: torch.device) -> torch.Tensor:
        """Rows [P] (on `device`) of `seqs`, brought up to date with their token_ids."""
        self._sweep()
        self._grow(sum(id(s) not in self.entries for s in seqs), vocab, device)
        rows, fresh, r_idx, t_idx, g_idx = [], [], [], [], []  # g_idx: token is generated
        for seq in seqs:
            entry = self.entries.get(id(seq))
            if entry is None:
                entry = self.entries[id(seq)] = [seq, self.free.pop(), 0]
                fresh.append(entry[1])
            row, start = entry[1], entry[2]
            new = seq.token_ids[start:]
            r_idx.extend([row] * len(new))
            t_idx.extend(new)
            g_idx.extend(p >= seq.num_prompt for p in range(start, start + len(new)))
            entry[2] = len(seq.token_ids)
            rows.append(row)
        if fresh:
            f = torch.tensor(fresh, dtype=torch.long, device=device)
            self.seen[f] = False
            self.gen[f] = 0.0
        if t_idx:
            ri = torch.tensor(r_idx, dtype=torch.long, device=device)
            ti = torch.tensor(t_idx, dtype=torch.long, device=device)
            self.seen[ri, ti] = True
            gen = [k for k, g in enumerate(g_idx) if g]  # on the host: no boolean-mask sync
            if gen:
                gi = torch.tensor(gen, dtype=torch.long, device=device)
                self.gen.index_put_((ri[gi], ti[gi]), torch.ones(1, dtype=torch.float32, device=device),
                                    accumulate=True)
        return torch.tensor(rows, dtype=torch.long, device=device)


def process(logits: torch.Tensor, seqs: list[Sequence], counts: TokenCounts | None = None) -> torch.Tensor:
    """logits: [B, V] fp32 (or log-probs, for beams), one row per sequence -> the processed rows
    (a new tensor when any processor applies): repetition penalty (over prompt and output), then
    presence / frequency penalties (over the output), then EOS masked while fewer than
    min_new_tokens are generated, then bad words whose prefix ends the sequence masked."""
    dev, V = logits.device, logits.shape[1]
    pen = [i for i, s in enumerate(seqs) if _penalised(s)]
    mask_r: list[int] = []
    mask_t: list[int] = []
    for i, seq in enumerate(seqs):
        s = seq.sampling
        if s.eos_token_ids and seq.num_generated < s.min_new_tokens:
            mask_r.extend([i] * len(s.eos_token_ids))
            mask_t.extend(s.eos_token_ids)
        for bad in s.bad_word_token_sequences:
            prefix = list(bad[:-1])
            if not prefix or seq.token_ids[-len(prefix):] == prefix:
                mask_r.append(i)
                mask_t.append(bad[-1])
    if not pen and not mask_r:
        return logits
    logits = logits.clone()
    if pen:
        psq = [seqs[i] for i in pen]
        counts = TokenCounts() if counts is None else counts
        rows = counts.rows_for(psq, V, dev)
        idx = torch.tensor(pen, dtype=torch.long, device=dev)
        params = torch.tensor([[s.sampling.repetition_penalty, s.sampling.frequency_penalty,
                                s.sampling.presence_penalty] for s in psq], dtype=logits.dtype, device=dev)
        rep, freq, pres = params[:, 0:1], params[:, 1:2], params[:, 2:3]  # [P, 1] each
        x = logits[idx]  # [P, V]
        x = torch.where(counts.seen[rows] & (rep != 1.0), torch.where(x > 0, x / rep, x * rep), x)
        gen = counts.gen[rows]
        x = x - (freq * gen + pres * (gen > 0).to(x.dtype))
        logits[idx] = x
    if mask_r:
        logits[torch.tensor(mask_r, dtype=torch.long, device=dev),
               torch.tensor(mask_t, dtype=torch.long, device=dev)] = NEG_INF
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: list[int] | int, top_p: list[float] | float) -> torch.Tensor:
    """logits: [S, V] (or [V]; already temperature-scaled); top_k, top_p: per row (host values; 0 /
    1 = off) -> tokens outside each row's top-k / nucleus set to -inf (ties at the k-th kept)."""
    squeeze = logits.dim() == 1
    z = logits[None] if squeeze else logits
    S, V = z.shape
    dev = z.device
    ks = [top_k] * S if isinstance(top_k, int) else list(top_k)
    ps = [top_p] * S if isinstance(top_p, float | int) else list(top_p)
    k_on = [0 < k < V for k in ks]
    if any(k_on):
        kk = [k if on else 1 for k, on in zip(ks, k_on)]
        kth = torch.topk(z, max(kk), dim=1).values.gather(
            1, torch.tensor(kk, dtype=torch.long, device=dev)[:, None] - 1)  # [S, 1]
        z = z.masked_fill((z < kth) & torch.tensor(k_on, device=dev)[:, None], NEG_INF)
    p_on = [0.0 < p < 1.0 for p in ps]
    if any(p_on):
        sorted_z, order = torch.sort(z, dim=1, descending=True)
        probs = sorted_z.softmax(-1)
        limit = torch.tensor(ps, dtype=z.dtype, device=dev)[:, None]
        on = torch.tensor(p_on, device=dev)[:, None]
        drop = (probs.cumsum(-1) - probs > limit) & on  # keep the smallest prefix reaching top_p
        z = torch.full_like(z, NEG_INF).scatter(1, order, sorted_z.masked_fill(drop, NEG_INF))
    return z[0] if squeeze else z


class Sampler:
    """The engine's sampler: holds the token counts of the running batch across steps."""

    def __init__(self):
        self.counts = TokenCounts()

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[float]]:
        tokens, logprobs = sample(logits, seqs, self.counts)
        constraints.advance(seqs, tokens)  # structured output: matchers take their row's token
        return tokens, logprobs


def sample(logits: torch.Tensor, seqs: list[Sequence], counts: TokenCounts | None = None
           ) -> tuple[list[int], list[float]]:
    """logits: [B, V] fp32, one row per sequence -> (token per row, its log-prob).

    Greedy rows (temperature 0 or top_k 1) take the argmax of their processed logits and its
    log_softmax. Sampled rows go through one batched top-k/top-p call (native/ops: the kernel
    where built, its float64 torch twin otherwise), each row drawing one uniform from its own
    generator; their log-prob (under the top-k/top-p filtered, temperature-scaled distribution) is
    computed only for requests that return log-probs, 0.0 otherwise. Rows with a grammar
    (structured output) are first masked to the tokens it allows (worker/engine/constraints.py),
    so their log-probs are under the constrained distribution. Rows whose request asks for
    `top_log_probs` k also get the k most likely tokens of the same distribution as their chosen
    token's log-prob, appended to `seq.top_log_probs` as (ids, log-probs), best first (fewer when
    fewer tokens survive top-k/top-p or the grammar). `counts`: the running batch's token counts
    (a fresh table when None). One host sync."""
    B = logits.shape[0]
    if B == 0:
        return [], []
    dev = logits.device
    x = constraints.apply_masks(process(logits, seqs, counts), seqs)  # structured output: grammar masks
    tokens = torch.argmax(x, -1)  # [B]
    dist = torch.log_softmax(x, -1)  # [B, V]: the distribution each row's log-prob is read from
    logprobs = dist.gather(1, tokens[:, None])[:, 0]  # [B]
    drawn = [i for i, s in enumerate(seqs) if not s.sampling.greedy]
    if drawn:
        params = [seqs[i].sampling for i in drawn]
        idx = torch.tensor(drawn, dtype=torch.long, device=dev)
        rows = x[idx] if len(drawn) < B else x  # [S, V]
        chosen = ops.sample_top_k_top_p(rows, [s.temperature for s in params], [s.top_k for s in params],
                                        [s.top_p for s in params], [seqs[i].generator for i in drawn]).to(dev)
        tokens = tokens.index_copy(0, idx, chosen)
        lps = torch.zeros(len(drawn), dtype=logprobs.dtype, device=dev)
        want = [j for j, s in enumerate(params) if s.return_log_probs]
        if want:
            w = torch.tensor(want, dtype=torch.long, device=dev)
            wp = [params[j] for j in want]
            temp = torch.tensor([s.temperature for s in wp], dtype=rows.dtype, device=dev)
            kept = filter_top_k_top_p(rows[w] / temp[:, None],  # keeps a superset of the kernel's kept set
                                      [s.top_k for s in wp], [s.top_p for s in wp])
            kept_lp = torch.log_softmax(kept, -1)  # [W, V]
            lps = lps.index_copy(0, w, kept_lp.gather(1, chosen[w][:, None])[:, 0])
            if any(s.top_log_probs for s in wp):
                dist = dist.index_copy(0, idx[w], kept_lp)
        logprobs = logprobs.index_copy(0, idx, lps)
    flat = [tokens.to(torch.float64), logprobs.to(torch.float64)]
    top = [i for i, s in enumerate(seqs) if s.sampling.top_log_probs]
    if top:
        k = min(max(seqs[i].sampling.top_log_probs for i in top), dist.shape[1])
        alt = dist[torch.tensor(top, dtype=torch.long, device=dev)].topk(k, dim=1)  # [T, k] each
        flat += [alt.indices.flatten().to(torch.float64), alt.values.flatten().to(torch.float64)]
    host = torch.cat(flat).tolist()  # the one sync (ids are exact in float64)
    toks, lps = [int(t) for t in host[:B]], host[B:2 * B]
    if top:
        ids, vals = host[2 * B:2 * B + len(top) * k], host[2 * B + len(top) * k:]
        for j, i in enumerate(top):
            want = min(seqs[i].sampling.top_log_probs, k)  # k <= V: a tiny vocabulary has fewer
            pairs = [(int(t), v) for t, v in zip(ids[j * k:j * k + want], vals[j * k:j * k + want]) if v > NEG_INF]
            seqs[i].top_log_probs.append(([t for t, _ in pairs], [v for _, v in pairs]))
    return toks, lps
