"""The engine: a model, its KV cache, a scheduler; one step = schedule, execute, postprocess.

Thread model: gRPC threads call `add` / `abort` (they only touch the inbox); one engine thread
runs `run_forever`, the only code that touches the scheduler, blocks and model. In the worker that is
its main thread, the one that loaded the model (worker/__main__.py: one OpenMP team per process).
"""

from __future__ import annotations

import logging
import queue
import threading
import traceback
from dataclasses import dataclass, field

import torch

from worker.config import WorkerConfig
from worker.engine.block_manager import BlockManager
from worker.engine.constraints import Grammars
from worker.engine.runner import ModelRunner, build_plan
from worker.engine.sampler import Sampler
from worker.engine.scheduler import Scheduler, SchedulerConfig
from worker.engine.sequence import Finish, Sampling, Sequence
from worker.engine.speculative import NgramProposer
from worker.models.registry import max_positions

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class EngineConfig(WorkerConfig):
    """The engine's view of the launch contract: worker/config.py holds every field and default."""

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    batch_size: int = 0
    batch_tokens: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    preemptions_total: int = 0
    steps_total: int = 0
    prompt_tokens_total: int = 0
    generated_tokens_total: int = 0
    kv_blocks_cached: int = 0  # blocks whose KV the prefix cache knows by hash (free or in use)
    prefix_cache_queries_total: int = 0  # prompt tokens looked up at admission
    prefix_cache_hits_total: int = 0  # of them found in the prefix cache (not prefilled)
    spec_decode_proposed_tokens_total: int = 0  # draft tokens the target verified
    spec_decode_accepted_tokens_total: int = 0  # of them accepted
    load_phases: dict = field(default_factory=dict)


class Engine:
    def __init__(self, model, model_config, config: EngineConfig, num_kv_blocks: int, draft=None):
        self.model = model
        self.model_config = model_config
        self.config = config
        self.max_model_len = config.max_model_len or max_positions(model_config)
        self.runner = ModelRunner(model, config.block_size, torch.device(config.device))
        self.kv_cache_bytes = self.runner.allocate_kv_cache(num_kv_blocks, config.torch_dtype)
        # encoder-decoder models: prompts feed the encoder, the decoder starts from this token
        self.encoder_decoder = bool(getattr(model, "is_encoder_decoder", False))
        # prefix caching is off for encoder-decoder models: a decoder block's KV depends on the
        # encoder's input, which the hash chain does not cover (and a decoder prompt is one token)
        self.blocks = BlockManager(num_kv_blocks, config.block_size,
                                   prefix_caching=config.prefix_caching and not self.encoder_decoder)
        self.proposer = self._proposer(draft, num_kv_blocks)
        self.scheduler = Scheduler(SchedulerConfig(config.max_batch_size, config.max_batch_tokens), self.blocks,
                                   self.max_model_len,
                                   num_speculative_tokens=config.num_speculative_tokens if self.proposer else 0)
        self.sampler = Sampler()  # keeps the running batch's token counts across steps
        # structured output: compiled grammars against the model's tokenizer (read on first use)
        self.grammars = Grammars(config.model_dir, int(getattr(model_config, "vocab_size", 0) or 0)
                                 or self.runner.vocab_size)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.wakeup = threading.Event()
        self.seqs: dict[str, Sequence] = {}
        self.stats = EngineStats(kv_blocks_total=num_kv_blocks)
        self.decoder_start_token_id = getattr(model_config, "decoder_start_token_id", None)
        if self.encoder_decoder and self.decoder_start_token_id is None:
            self.decoder_start_token_id = model_config.pad_token_id  # T5's convention
        self.next_cross_slot = 0
        self.cross_free: list[int] = []  # slots of finished requests, freed at the next step
        # called on the engine thread at the end of every step (idle ones too), after every emit of
        # the step: a session sends the step's events as one message (worker/stream.py Session)
        self.step_listeners: list = []

    def _proposer(self, draft, num_kv_blocks: int):
        """The speculative proposer (worker/engine/speculative.py), or None when off; `draft`: the draft
        model and its config (build.py load_draft). Encoder-decoder models do not speculate."""
        method = self.config.speculative_method
        if not method or self.encoder_decoder:
            if method:
                log.warning("speculative decoding is off for encoder-decoder models")
            return None
        if method == "ngram":
            return NgramProposer()
        if draft is None:
            raise ValueError("speculative_method 'draft' needs the draft model (build.py load_draft)")
        from worker.engine.draft import DraftProposer

        bs, k = self.config.block_size, self.config.num_speculative_tokens
        # as many blocks as the target's, plus each running sequence's lookahead
        blocks = num_kv_blocks + self.config.max_batch_size * -(-(k + 1) // bs)
        vocab = int(getattr(self.model_config, "vocab_size", 0) or 0)
        draft_model, draft_config = draft
        proposer = DraftProposer(draft_model, bs, blocks, torch.device(self.config.device), self.config.torch_dtype,
                                 vocab, max_positions(draft_config))
        log.info("speculative decoding: draft model %s, %d tokens a step, its KV cache %d blocks (%.1f MB)",
                 self.config.speculative_model, k, blocks, proposer.kv_cache_bytes / 1e6)
        return proposer

    def new_sequence(self, request_id: str, prompt: list[int], sampling: Sampling, emit=None) -> Sequence:
        """A request as the engine runs it (any thread). Encoder-decoder: the prompt is the
        encoder's input and the decoder starts from decoder_start_token_id."""
        kw = {} if emit is None else {"emit": emit}
        if not self.encoder_decoder:
            return Sequence(request_id, list(prompt), sampling, **kw)
        return Sequence(request_id, [int(self.decoder_start_token_id)], sampling, encoder_ids=list(prompt), **kw)

    # ---- called from other threads -------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.inbox.put(("add", seq))
        self.wakeup.set()

    def abort(self, request_id: str) -> None:
        self.inbox.put(("abort", request_id))
        self.wakeup.set()

    # ---- engine thread --------------------------------------------------------------------
    def _drain_inbox(self) -> None:
        while True:
            try:
                op, arg = self.inbox.get_nowait()
            except queue.Empty:
                return
            if op == "add":
                if not arg.sampling.greedy:
                    arg.generator = torch.Generator(device="cpu").manual_seed(int(arg.sampling.seed))
                self.seqs[arg.request_id] = arg
                if arg.encoder_ids is not None:
                    arg.cross_slot = self.next_cross_slot
                    self.next_cross_slot += 1
                self.scheduler.add(arg)
                self.stats.prompt_tokens_total += arg.num_input_tokens
            elif op == "abort":
                seq = self.seqs.get(arg)
                if seq is not None:
                    self._finish(seq, Finish.ABORTED)

    def _finish(self, seq: Sequence, reason: Finish, new: list[int] = (), lps: list[float] = (), error: str = ""):
        self.scheduler.finish(seq, reason)
        self.seqs.pop(seq.request_id, None)
        if seq.cross_slot >= 0:
            self.cross_free.append(seq.cross_slot)
        seq.emit(list(new), list(lps), reason, error)

    def step(self) -> bool:
        """One engine step; returns False when there was nothing to do."""
        try:
            return self._step()
        finally:
            for listener in tuple(self.step_listeners):
                listener()

    def _step(self) -> bool:
        self._drain_inbox()
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return False
        try:
            if any(batch.lookahead):
                self._propose(batch)
            plan = build_plan(batch, self.config.block_size, self.cross_free)
            self.cross_free = []
            logits = self.runner.run(plan)
            for seq in batch.seqs:
                seq.encoded = True
            self.stats.generated_tokens_total += self.scheduler.postprocess(batch, logits, self.sampler,
                                                                            self._finish)
        except Exception as e:  # a failing step fails its requests, never the worker
            log.error("engine step failed: %s\n%s", e, traceback.format_exc())
            for seq in batch.seqs:
                self._finish(seq, Finish.ERROR, error=f"engine step failed: {e}")
        self.stats.steps_total += 1
        self.stats.batch_size = len(batch.seqs)
        self.stats.batch_tokens = batch.total_tokens
        return True

    def _propose(self, batch) -> None:
        """Fill the batch's lookahead slots with proposals; free the blocks of the slots left empty."""
        rows = [i for i, k in enumerate(batch.lookahead) if k]
        drafts, probs = self.proposer.propose([batch.seqs[i] for i in rows], [batch.lookahead[i] for i in rows])
        self.scheduler.set_drafts(batch, drafts, probs)

    def snapshot_stats(self) -> EngineStats:
        st = self.stats
        st.running = len(self.scheduler.running)
        st.waiting = len(self.scheduler.waiting)
        st.kv_blocks_used = self.blocks.num_used
        st.preemptions_total = self.scheduler.preemptions
        st.kv_blocks_cached = self.blocks.num_cached
        st.prefix_cache_queries_total = self.blocks.queries
        st.prefix_cache_hits_total = self.blocks.hits
        st.spec_decode_proposed_tokens_total = self.scheduler.spec_proposed
        st.spec_decode_accepted_tokens_total = self.scheduler.spec_accepted
        return st

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            if not self.step():
                self.wakeup.wait(timeout=0.05)
                self.wakeup.clear()
