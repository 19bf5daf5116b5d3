"""The worker's gRPC servicer: a thin wrapper that turns proto messages into engine calls."""

from __future__ import annotations

import logging
import queue
import threading
import time

import grpc

from shardserve.v1 import worker_pb2 as pb
from shardserve.v1 import worker_pb2_grpc as pb_grpc
from worker.engine.engine import Engine
from worker.engine.sequence import Sampling
from worker.stream import Outgoing, Refused, Session, coalesce

log = logging.getLogger(__name__)

def sampling_from_pb(p: pb.SamplingParams) -> Sampling:
    seqs = lambda xs: tuple(tuple(int(t) for t in x.token_ids) for x in xs if x.token_ids)  # noqa: E731
    return Sampling(
        max_new_tokens=int(p.max_new_tokens),
        temperature=float(p.temperature),
        top_k=int(p.top_k),
        top_p=float(p.top_p) if p.top_p > 0 else 1.0,
        seed=int(p.seed),
        repetition_penalty=float(p.repetition_penalty) or 1.0,
        presence_penalty=float(p.presence_penalty),
        frequency_penalty=float(p.frequency_penalty),
        min_new_tokens=int(p.min_new_tokens),
        eos_token_ids=tuple(int(t) for t in p.eos_token_ids),
        stop_token_sequences=seqs(p.stop_token_sequences),
        bad_word_token_sequences=seqs(p.bad_word_token_sequences),
        return_log_probs=bool(p.return_log_probs or p.top_log_probs),
        top_log_probs=int(p.top_log_probs),
        num_beams=max(1, int(p.num_beams)),
        length_penalty=float(p.length_penalty),
        beam_search_diversity_rate=float(p.beam_search_diversity_rate),
        grammar=p.grammar,
    )


class WorkerService(pb_grpc.WorkerServicer):
    def __init__(self, engine: Engine, info: dict):
        self.engine = engine
        self.info = info  # static facts for Status: architecture, dtype, ranks, ...

    def admit(self, request: pb.WorkerGenerateRequest, emit) -> Outgoing:
        """Check a request and make its sequence (not yet added to the engine); raises Refused.
        A grammar is compiled here, on the calling thread, never on the engine's (cached per grammar)."""
        if not request.prompt_token_ids:
            raise Refused("prompt_token_ids is empty")
        vocab = self.info["vocab_size"]
        bad = [t for t in request.prompt_token_ids if t >= vocab]
        if bad:
            raise Refused(f"prompt_token_ids: ids {bad[:5]} >= vocab_size {vocab}")
        limit, prompt, new = self.engine.max_model_len, len(request.prompt_token_ids), request.sampling.max_new_tokens
        if self.engine.encoder_decoder and prompt > limit:
            raise Refused(f"prompt ({prompt} tokens) exceeds the encoder's limit of {limit}")
        if self.engine.encoder_decoder and new > limit - 1:
            raise Refused(f"max_new_tokens ({new}) exceeds the decoder's limit of {limit - 1} new tokens")
        if not self.engine.encoder_decoder and prompt + new > limit:
            # refused, not cut short: the sequence would end with LENGTH long before max_new_tokens
            raise Refused(f"prompt ({prompt} tokens) + max_new_tokens ({new}) = {prompt + new} exceeds the "
                          f"model's context of {limit} tokens (max_model_len)")
        seq = self.engine.new_sequence(request.request_id, list(request.prompt_token_ids),
                                       sampling_from_pb(request.sampling), emit=emit)
        if seq.sampling.grammar:
            if seq.sampling.num_beams > 1:
                raise Refused("parameter grammar: not available with beam search")
            try:
                seq.matcher = self.engine.grammars.matcher(seq.sampling.grammar)
            except ValueError as e:
                raise Refused(f"parameter grammar: {e}") from None
        return Outgoing(seq, time.monotonic())

    def Generate(self, request: pb.WorkerGenerateRequest, context: grpc.ServicerContext):
        out: queue.SimpleQueue = queue.SimpleQueue()
        try:
            req = self.admit(request, emit=lambda toks, lps, fin, err: out.put((toks, lps, fin, err)))
        except Refused as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        context.add_callback(lambda: self.engine.abort(request.request_id))
        self.engine.add(req.seq)
        while True:
            toks, lps, fin, err = coalesce(out)
            yield req.message(toks, lps, fin, err)
            if fin is not None:
                return

    def Session(self, request_iterator, context: grpc.ServicerContext):
        session = Session(self, context)
        threading.Thread(target=session.read, args=(request_iterator,), daemon=True, name="session-in").start()
        yield from session.messages()

    def Status(self, request, context):
        st = self.engine.snapshot_stats()
        resp = pb.WorkerStatusResponse(
            architecture=self.info["architecture"],
            vocab_size=self.info["vocab_size"],
            max_model_len=self.engine.max_model_len,
            dtype=self.engine.config.dtype,
            tensor_parallel=self.info.get("tp", 1),
            pipeline_parallel=self.info.get("pp", 1),
            encoder_decoder=self.info.get("encoder_decoder", False),
            kernel_path=self.info.get("kernel_path", "torch"),
            block_size=self.engine.config.block_size,
            stats=pb.EngineStats(
                running=st.running, waiting=st.waiting, batch_size=st.batch_size, batch_tokens=st.batch_tokens,
                kv_blocks_total=st.kv_blocks_total, kv_blocks_used=st.kv_blocks_used,
                preemptions_total=st.preemptions_total, steps_total=st.steps_total,
                prompt_tokens_total=st.prompt_tokens_total, generated_tokens_total=st.generated_tokens_total,
                kv_blocks_cached=st.kv_blocks_cached, prefix_cache_queries_total=st.prefix_cache_queries_total,
                prefix_cache_hits_total=st.prefix_cache_hits_total,
                spec_decode_proposed_tokens_total=st.spec_decode_proposed_tokens_total,
                spec_decode_accepted_tokens_total=st.spec_decode_accepted_tokens_total,
            ),
        )
        for phase, secs in st.load_phases.items():
            resp.load_phases.add(phase=phase, seconds=secs)
        for r in self.info.get("ranks", []):
            resp.ranks.add(**r)
        return resp
