"""One request inside the engine."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from worker.engine.beam import BeamGroup


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Finish(enum.Enum):
    LENGTH = "length"
    EOS = "eos"
    STOP = "stop"
    ABORTED = "aborted"
    ERROR = "error"


@dataclass(frozen=True)
class Sampling:
    """Resolved per-request sampling parameters (see worker.proto SamplingParams)."""

    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_new_tokens: int = 0
    eos_token_ids: tuple[int, ...] = ()
    stop_token_sequences: tuple[tuple[int, ...], ...] = ()
    bad_word_token_sequences: tuple[tuple[int, ...], ...] = ()
    return_log_probs: bool = False
    top_log_probs: int = 0  # > 0: also the k most likely tokens per step (Sequence.top_log_probs)
    num_beams: int = 1  # > 1: beam search (worker.engine.beam); sampling fields are then unused
    length_penalty: float = 0.0  # FT default; finished beam score = sum(log-probs) / generated_len ** length_penalty
    beam_search_diversity_rate: float = 0.0  # FT: rank-k sibling candidate of a beam scored -rate * k
    grammar: str = ""  # structured output: an llguidance grammar (worker.engine.constraints); "" = none

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass
class Sequence:
    """Invariant: num_computed <= len(token_ids); tokens [0, num_computed) have K/V in the cache."""

    request_id: str
    token_ids: list[int]
    sampling: Sampling
    # called from the engine thread with (new_token_ids, log_probs, finish or None)
    emit: Callable[[list[int], list[float], Finish | None, str], None] = lambda *a: None
    num_prompt: int = 0
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    num_hashed: int = 0  # leading blocks of block_table registered in the prefix cache (block_manager)
    status: Status = Status.WAITING
    finish: Finish | None = None
    arrival: float = field(default_factory=time.monotonic)
    first_scheduled: float | None = None
    generator: torch.Generator | None = None
    cum_log_prob: float = 0.0
    # per generated token, with sampling.top_log_probs: (ids, log-probs) of the most likely tokens,
    # best first (appended by the sampler before the token is emitted)
    top_log_probs: list[tuple[list[int], list[float]]] = field(default_factory=list)
    beam: BeamGroup | None = None  # the beam group this sequence is a beam of (or whose handle it is)
    # encoder-decoder models: the prompt feeds the encoder (token_ids starts with the decoder
    # start token); cross_slot names the request's cross-attention state in the model runner
    encoder_ids: list[int] | None = None
    cross_slot: int = -1
    encoded: bool = False
    # structured output: the llguidance matcher of sampling.grammar, advanced by every output token
    # (worker.engine.constraints); None when unconstrained
    matcher: object | None = None

    def __post_init__(self):
        if not self.num_prompt:
            self.num_prompt = len(self.token_ids)

    @property
    def num_input_tokens(self) -> int:
        """Prompt tokens as the client sent them (the encoder's input for encoder-decoder models)."""
        return len(self.encoder_ids) if self.encoder_ids is not None else self.num_prompt

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def generated(self) -> list[int]:
        return self.token_ids[self.num_prompt:]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed
