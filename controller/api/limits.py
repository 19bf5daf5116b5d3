"""Limits on every input of a generation request, checked before anything is tokenized or copied
(README "Limits"). Each violation is a RequestError naming the field and the limit."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from controller.api.params import RequestError, invalid
from shardserve.v1 import generate_pb2 as gpb


@dataclass(frozen=True)
class RequestLimits:
    max_prompt_bytes: int = 1 << 20  # one prompt's text, UTF-8 bytes
    max_prompts: int = 256  # prompts x n (samples) in one request
    max_stop_strings: int = 64  # stop strings plus stop token sequences
    max_stop_bytes: int = 1024  # one stop string, UTF-8 bytes (or tokens of one stop sequence)
    max_bad_words: int = 1024  # bad words plus bad-word token sequences
    max_bad_word_bytes: int = 1024  # one bad word, UTF-8 bytes (or tokens of one sequence)
    max_message_bytes: int = 16 << 20  # one gRPC message, either way (gRPC answers RESOURCE_EXHAUSTED)

    def __post_init__(self):
        for name, value in self.__dict__.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: must be an integer >= 1")


def _utf8_len(s: str) -> int:
    return len(s.encode("utf-8", "surrogatepass"))


def check_prompt(prompt: str | list[int], limits: RequestLimits, field: str = "prompt") -> None:
    if isinstance(prompt, str) and len(prompt) * 4 > limits.max_prompt_bytes and _utf8_len(prompt) > limits.max_prompt_bytes:
        raise invalid(f"field {field}: {_utf8_len(prompt)} bytes exceeds the limit of "
                      f"{limits.max_prompt_bytes} bytes per prompt")


def check_count(prompts: int, n: int, limits: RequestLimits, field: str = "prompts") -> None:
    """prompts x samples (n; 0 means 1) against max_prompts, before any copy is made."""
    total = prompts * max(n, 1)
    if total > limits.max_prompts:
        what = f"{prompts} prompts x n={n}" if n > 1 else f"{prompts} prompts"
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"field {field if n <= 1 else field + ', n'}: {what} = {total} sequences exceeds "
                           f"the limit of {limits.max_prompts} per request")


def check_parameters(p: gpb.GenerationParameters, limits: RequestLimits) -> None:
    stops = len(p.stop) + len(p.stop_token_sequences)
    if stops > limits.max_stop_strings:
        raise invalid(f"parameter stop: {stops} stop strings/sequences exceeds the limit of "
                      f"{limits.max_stop_strings}")
    for s in p.stop:
        if len(s) * 4 > limits.max_stop_bytes and _utf8_len(s) > limits.max_stop_bytes:
            raise invalid(f"parameter stop: a stop string of {_utf8_len(s)} bytes exceeds the limit of "
                          f"{limits.max_stop_bytes} bytes")
    for seq in p.stop_token_sequences:
        if len(seq.token_ids) > limits.max_stop_bytes:
            raise invalid(f"parameter stop_token_sequences: a sequence of {len(seq.token_ids)} tokens exceeds "
                          f"the limit of {limits.max_stop_bytes}")
    bad = len(p.bad_words) + len(p.bad_word_token_sequences)
    if bad > limits.max_bad_words:
        raise invalid(f"parameter bad_words: {bad} bad words/sequences exceeds the limit of {limits.max_bad_words}")
    for w in p.bad_words:
        if len(w) * 4 > limits.max_bad_word_bytes and _utf8_len(w) > limits.max_bad_word_bytes:
            raise invalid(f"parameter bad_words: a bad word of {_utf8_len(w)} bytes exceeds the limit of "
                          f"{limits.max_bad_word_bytes} bytes")
    for seq in p.bad_word_token_sequences:
        if len(seq.token_ids) > limits.max_bad_word_bytes:
            raise invalid(f"parameter bad_word_token_sequences: a sequence of {len(seq.token_ids)} tokens exceeds "
                          f"the limit of {limits.max_bad_word_bytes}")
