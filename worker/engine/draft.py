"""The draft-model proposer of speculative decoding: a small model with the target's tokenizer, run
in the leader's process (tensor and pipeline parallel degree 1 only) on its own paged KV cache.

Each speculating sequence has a shadow Sequence here: the same tokens, its own block table in the
draft's BlockManager (no prefix caching) and its own count of computed tokens. A proposal for k
tokens is one batched draft forward that catches every shadow up with its sequence (a new shadow
prefills the whole prompt; otherwise the one or two tokens the target appended since) and gives
d_1, then k - 1 one-token steps. After the target verified, a shadow keeps the K/V of the tokens its
sequence accepted and recomputes the rest the next time. Greedy sequences take the draft's argmax
(q is then one-hot); sampled ones draw from the draft's own sampling distribution (the sequence's
temperature / top-k / top-p) with a generator of their own, and q goes to verification.
Shadows of finished sequences are released at the next proposal; a sequence whose shadow does not
fit the draft's cache gets no proposal that step (it decodes one token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.engine.block_manager import BlockManager
from worker.engine.runner import ModelRunner, build_plan
from worker.engine.scheduler import ScheduledBatch
from worker.engine.sequence import Sampling, Sequence, Status
from worker.engine.speculative import _uniform, draw, sampling_probs

DRAFT_SEED = 0x5EC0  # xor-ed into a request's seed for its draft generator


@dataclass
class Shadow(Sequence):
    """A sequence as the draft model holds it: token_ids = the sequence's first `synced` tokens,
    then the drafts proposed since."""

    synced: int = 0


class DraftProposer:
    def __init__(self, model, block_size: int, num_blocks: int, device: torch.device, dtype: torch.dtype,
                 vocab_size: int, max_len: int):
        self.runner = ModelRunner(model, block_size, device)
        self.kv_cache_bytes = self.runner.allocate_kv_cache(num_blocks, dtype)
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching=False)
        self.vocab_size = vocab_size  # the target's: draft logits are cut or padded to it
        self.max_len = max_len  # the draft's positions: no proposal past them
        self.shadows: dict[int, tuple[Sequence, Shadow]] = {}  # id(seq) -> (seq, its shadow)

    def _sweep(self) -> None:
        for key in [k for k, (seq, _) in self.shadows.items() if seq.status is Status.FINISHED]:
            self.blocks.release(self.shadows.pop(key)[1])

    def _shadow(self, seq: Sequence) -> Shadow:
        got = self.shadows.get(id(seq))
        if got is None:
            shadow = Shadow(seq.request_id, [], Sampling())
            if not seq.sampling.greedy:
                shadow.generator = torch.Generator(device="cpu").manual_seed(int(seq.sampling.seed) ^ DRAFT_SEED)
            self.shadows[id(seq)] = (seq, shadow)
            return shadow
        shadow = got[1]
        # the shadow holds seq's tokens up to `synced` plus its drafts; its K/V stays valid up to the
        # first token the sequence did not accept
        same = shadow.synced
        for a, b in zip(shadow.token_ids[same:], seq.token_ids[same:]):
            if a != b:
                break
            same += 1
        shadow.num_computed = min(shadow.num_computed, same)
        return shadow

    def _logits(self, shadows: list[Sequence], chunks: list[int]) -> torch.Tensor:
        plan = build_plan(ScheduledBatch(shadows, chunks), self.blocks.block_size)
        logits = self.runner.run(plan)  # [R, V_draft] fp32, the last token of each row
        for s, n in zip(shadows, chunks):
            s.num_computed += n
        V = self.vocab_size
        if logits.shape[1] > V:
            return logits[:, :V]
        if logits.shape[1] < V:
            pad = logits.new_full((logits.shape[0], V - logits.shape[1]), float("-inf"))
            return torch.cat([logits, pad], 1)
        return logits

    def propose(self, seqs: list[Sequence], ks: list[int]) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        self._sweep()
        drafts: list[list[int]] = [[] for _ in seqs]
        qs: list[list[torch.Tensor]] = [[] for _ in seqs]
        rows, shadows, chunks = [], [], []
        for i, seq in enumerate(seqs):
            if len(seq.token_ids) + ks[i] > self.max_len:
                continue
            shadow = self._shadow(seq)
            shadow.token_ids = list(seq.token_ids)
            shadow.synced = len(seq.token_ids)
            shadow.num_computed = min(shadow.num_computed, len(shadow.token_ids) - 1)  # logits need one token
            n = len(shadow.token_ids) - shadow.num_computed
            need = self.blocks.blocks_needed(shadow, shadow.num_computed + n + ks[i] - 1)
            if need > self.blocks.num_free:
                continue  # no proposal this step
            self.blocks.allocate(shadow, shadow.num_computed + n + ks[i] - 1)
            rows.append(i)
            shadows.append(shadow)
            chunks.append(n)
        step = 0
        while rows:
            logits = self._logits(shadows, chunks)
            sampled = [j for j, i in enumerate(rows) if not seqs[i].sampling.greedy]
            tokens = torch.argmax(logits, -1).tolist()
            if sampled:
                q = sampling_probs(logits[sampled], [seqs[rows[j]] for j in sampled], [1] * len(sampled))
                for r, j in enumerate(sampled):
                    tokens[j] = draw(q[r], _uniform(shadows[j].generator))
                    qs[rows[j]].append(q[r])
            for j, i in enumerate(rows):
                drafts[i].append(int(tokens[j]))
                shadows[j].token_ids.append(int(tokens[j]))
            step += 1
            keep = [j for j, i in enumerate(rows) if ks[i] > step]
            rows = [rows[j] for j in keep]
            shadows = [shadows[j] for j in keep]
            chunks = [1] * len(rows)
        probs = [torch.stack(q) if q else None for q in qs]
        return drafts, probs
