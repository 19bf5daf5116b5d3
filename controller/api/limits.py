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
        if self.max_message_bytes > (1 << 31) - 1:  # gRPC takes it as a C int
            raise ValueError(f"max_message_bytes={self.max_message_bytes}: must be at most {(1 << 31) - 1}")


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


def _check_words(words, seqs, max_count: int, max_len: int, field: str, seq_field: str, what: str) -> None:
    """One kind of word list (stop strings or bad words): how many strings plus token sequences, each
    string's UTF-8 bytes and each sequence's tokens, against their limits."""
    count = len(words) + len(seqs)
    if count > max_count:
        raise invalid(f"parameter {field}: {count} {what}s/sequences exceeds the limit of {max_count}")
    for w in words:
        if len(w) * 4 > max_len and _utf8_len(w) > max_len:
            raise invalid(f"parameter {field}: a {what} of {_utf8_len(w)} bytes exceeds the limit of "
                          f"{max_len} bytes")
    for seq in seqs:
        if len(seq.token_ids) > max_len:
            raise invalid(f"parameter {seq_field}: a sequence of {len(seq.token_ids)} tokens exceeds "
                          f"the limit of {max_len}")


def check_parameters(p: gpb.GenerationParameters, limits: RequestLimits) -> None:
    _check_words(p.stop, p.stop_token_sequences, limits.max_stop_strings, limits.max_stop_bytes,
                 "stop", "stop_token_sequences", "stop string")
    _check_words(p.bad_words, p.bad_word_token_sequences, limits.max_bad_words, limits.max_bad_word_bytes,
                 "bad_words", "bad_word_token_sequences", "bad word")
