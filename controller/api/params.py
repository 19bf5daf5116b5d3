"""Generation parameters: user names (FasterTransformer, Hugging Face) -> the typed proto ->
the worker's fully resolved SamplingParams. Every error names the parameter and its range.

Semantics (FasterTransformer defaults where a parameter is absent):
- greedy unless sampling is asked for: do_sample=true, or top_k > 1 / top_k = 0 given, or top_p in (0, 1)
  given without top_k; FT's default top_k=1 means greedy, and temperature alone does not switch to sampling;
- max_new_tokens defaults to FT's max_seq_len default, 200 (capped by the context);
- repetition_penalty and presence_penalty are exclusive (as in FT);
- random_seed defaults to FT's 0: an unseeded sampled request is reproducible, like FT's;
- num_beams (FT beam_width) > 1 is beam search; len_penalty defaults to FT's 0.0 (HF's is 1.0: send
  length_penalty=1.0 for HF results); sampling parameters are ignored by beam search (as in FT);
- stop words / bad words: strings (encoded without special tokens) or lists of token-id lists
  (FT's form); a flat list of ints is one token sequence.
"""

from __future__ import annotations

import json

import grpc

from controller.api.constraints import ConstraintError, from_parameters
from shardserve.v1 import generate_pb2 as gpb
from shardserve.v1 import worker_pb2 as wpb

DEFAULT_MAX_NEW_TOKENS = 200
MAX_BEAMS = 16
MAX_TOP_LOG_PROBS = 20  # as OpenAI's top_logprobs
UINT32_MAX = (1 << 32) - 1
UINT64_MAX = (1 << 64) - 1

# user-facing name -> canonical proto field
ALIASES = {
    "max_new_tokens": "max_new_tokens", "max_seq_len": "max_new_tokens", "max_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "do_sample": "do_sample",
    "seed": "seed", "random_seed": "seed",
    "repetition_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "min_new_tokens": "min_new_tokens", "min_length": "min_new_tokens",
    "num_beams": "num_beams", "beam_width": "num_beams",
    "length_penalty": "length_penalty", "len_penalty": "length_penalty",
    "beam_search_diversity_rate": "beam_search_diversity_rate",
    "stop": "stop", "stop_words_list": "stop", "stop_sequences": "stop",
    "bad_words": "bad_words", "bad_words_list": "bad_words",
    "return_log_probs": "return_log_probs", "is_return_output_log_probs": "return_log_probs",
    "return_cum_log_probs": "return_cum_log_probs", "is_return_cum_log_probs": "return_cum_log_probs",
    "ignore_eos": "ignore_eos",
    "top_log_probs": "top_log_probs", "top_logprobs": "top_log_probs", "top_n_tokens": "top_log_probs",
    # structured output (the constraint oneof; vLLM's guided_* names too)
    "json_schema": "json_schema", "guided_json": "json_schema",
    "regex": "regex", "guided_regex": "regex",
    "choice": "choice", "guided_choice": "choice",
    "grammar": "grammar", "guided_grammar": "grammar",
    "json_object": "json_object",
}


class RequestError(Exception):
    """A request the server refuses: carries the gRPC status code and a message for a person."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _coerce(field, name: str, value):
    """A JSON / CLI value -> the python type the proto field wants."""
    want = field.type
    try:
        if field.is_repeated:
            items = value if isinstance(value, list) else [value]
            if field.message_type is not None:  # TokenSequence: a list of ints
                return [gpb.TokenSequence(token_ids=[int(t) for t in seq]) for seq in items]
            return [str(v) for v in items]
        if want == field.TYPE_STRING:
            if not isinstance(value, str):
                raise ValueError
            return value
        if want == field.TYPE_BOOL:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return value.lower() in ("true", "1")
            return bool(value)
        if want in (field.TYPE_FLOAT, field.TYPE_DOUBLE):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        v = int(value)
        top = UINT64_MAX if want == field.TYPE_UINT64 else UINT32_MAX
        if v < 0 or v > top:
            raise invalid(f"parameter {name}: {v} is out of range [0, {top}]")
        return v
    except (TypeError, ValueError):
        kind = {field.TYPE_BOOL: "a boolean", field.TYPE_FLOAT: "a number", field.TYPE_STRING: "a string"}.get(want, "a non-negative integer")
        if field.is_repeated:
            kind = "a list of token-id lists" if field.message_type is not None else "a string or list of strings"
        raise invalid(f"parameter {name}: expected {kind}, got {value!r}") from None


def parameters_from_dict(params: dict) -> gpb.GenerationParameters:
    """{"max_seq_len": 20, "temperature": "0.7", ...} -> GenerationParameters; unknown names refused."""
    msg = gpb.GenerationParameters()
    fields = gpb.GenerationParameters.DESCRIPTOR.fields_by_name
    stop_ids, bad_ids = [], []
    for name, value in params.items():
        canonical = ALIASES.get(name)
        if canonical is None:
            raise invalid(f"unknown parameter {name!r}; known: {', '.join(sorted(ALIASES))}")
        if canonical in ("json_schema", "choice"):  # a schema as a JSON object; choices as a list of strings
            _constraint(msg, canonical, name, value)
            continue
        if canonical in ("stop", "bad_words") and isinstance(value, list) and any(
                isinstance(v, (list, int)) and not isinstance(v, bool) for v in value):  # FT style: token ids
            if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                value = [value]  # one sequence
            elif not all(isinstance(v, list) for v in value):
                raise invalid(f"parameter {name}: expected strings or lists of token ids, got {value!r}")
            target = stop_ids if canonical == "stop" else bad_ids
            target.extend(_coerce(fields["stop_token_sequences"], name, value))
            continue
        field = fields[canonical]
        coerced = _coerce(field, name, value)
        if field.is_repeated:
            getattr(msg, canonical).extend(coerced)
        else:
            setattr(msg, canonical, coerced)
    msg.stop_token_sequences.extend(stop_ids)
    msg.bad_word_token_sequences.extend(bad_ids)
    return msg


def _constraint(msg: gpb.GenerationParameters, canonical: str, name: str, value) -> None:
    if canonical == "json_schema":
        if not isinstance(value, str | dict | bool):
            raise invalid(f"parameter {name}: expected a JSON Schema (an object, or its JSON text), got {value!r}")
        msg.json_schema = value if isinstance(value, str) else json.dumps(value)
        return
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise invalid(f"parameter {name}: expected a list of strings, got {value!r}")
    msg.choice.choices.extend(value)


def _range(name: str, value, lo, hi, lo_open=False) -> None:
    if not lo <= value <= hi or (lo_open and value == lo):  # NaN fails the chained comparison
        left = "(" if lo_open else "["
        raise invalid(f"parameter {name}: {value} is out of range {left}{lo}, {hi}]")


def beam_blocks(beams: int, prompt_tokens: int, max_new: int, block_size: int) -> int:
    """KV blocks a beam request can hold at once: its full prompt blocks shared by every beam, and
    each beam's own blocks for the partial prompt block and up to `max_new` tokens."""
    shared = prompt_tokens // block_size
    return shared + beams * (-(-(prompt_tokens + max_new) // block_size) - shared)


def _check_beams_fit(beams: int, prompt_tokens: int, max_new: int, kv_blocks: int, block_size: int) -> None:
    """A beam request larger than the whole KV cache would preempt itself forever: refuse it."""
    if not kv_blocks or not block_size:
        return  # not known yet (no replica ready): the worker's scheduler still bounds it
    need = beam_blocks(beams, prompt_tokens, max_new, block_size)
    if need > kv_blocks:
        raise invalid(f"parameter num_beams: {beams} beams of up to {max_new} new tokens after a "
                      f"{prompt_tokens}-token prompt need {need} KV-cache blocks of {block_size} tokens; "
                      f"this model's cache holds {kv_blocks}: lower num_beams or max_new_tokens")


def resolve(p: gpb.GenerationParameters, *, prompt_tokens: int, max_model_len: int, vocab_size: int,
            eos_token_ids: tuple[int, ...], encode_plain, encoder_decoder: bool = False,
            kv_cache: tuple[int, int] = (0, 0)) -> wpb.SamplingParams:
    """Validate user parameters and fill every worker field. Raises RequestError.

    Encoder-decoder models (T5): the prompt feeds the encoder and the decoder starts from its own
    start token, so max_model_len limits each side separately: prompt <= max_model_len and
    max_new_tokens <= max_model_len - 1 (the decoder's start token takes one position)."""
    has = p.HasField
    room = max_model_len - 1 if encoder_decoder else max_model_len - prompt_tokens
    max_new = p.max_new_tokens if has("max_new_tokens") else min(DEFAULT_MAX_NEW_TOKENS, max(1, room))
    if max_new < 1:
        raise invalid(f"parameter max_new_tokens: must be >= 1, got {max_new}")
    if encoder_decoder:
        if prompt_tokens > max_model_len:
            raise invalid(f"prompt ({prompt_tokens} tokens) exceeds the encoder's limit of {max_model_len} tokens")
        if max_new > room:
            raise invalid(f"max_new_tokens ({max_new}) exceeds the decoder's limit of {room} new tokens")
    elif prompt_tokens + max_new > max_model_len:
        raise invalid(f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new}) = {prompt_tokens + max_new} "
                      f"exceeds the model's context of {max_model_len} tokens")
    temperature = p.temperature if has("temperature") else 1.0
    _range("temperature", temperature, 0.0, 100.0)
    top_k = p.top_k if has("top_k") else None
    if top_k is not None:
        _range("top_k", top_k, 0, vocab_size)
    top_p = p.top_p if has("top_p") else 0.0
    _range("top_p", top_p, 0.0, 1.0)
    if has("do_sample"):
        sampling = p.do_sample
    elif top_k is not None:
        sampling = top_k != 1
    else:
        sampling = 0.0 < top_p < 1.0
    if sampling and temperature == 0.0:
        sampling = False
    rep = p.repetition_penalty if has("repetition_penalty") else 1.0
    _range("repetition_penalty", rep, 0.0, 100.0, lo_open=True)
    if has("presence_penalty") and has("repetition_penalty"):
        raise invalid("parameters repetition_penalty and presence_penalty are exclusive: set one of them")
    pres = p.presence_penalty if has("presence_penalty") else 0.0
    freq = p.frequency_penalty if has("frequency_penalty") else 0.0
    _range("presence_penalty", pres, -2.0, 2.0)
    _range("frequency_penalty", freq, -2.0, 2.0)
    min_new = p.min_new_tokens if has("min_new_tokens") else 0
    if min_new > max_new:
        raise invalid(f"parameter min_new_tokens: {min_new} is larger than max_new_tokens {max_new}")
    beams = p.num_beams if has("num_beams") else 1
    _range("num_beams", beams, 1, MAX_BEAMS)
    length_penalty = p.length_penalty if has("length_penalty") else 0.0
    _range("length_penalty", length_penalty, -10.0, 10.0)
    diversity = p.beam_search_diversity_rate
    _range("beam_search_diversity_rate", diversity, 0.0, 100.0)
    if beams > 1 and encoder_decoder:
        raise invalid("parameter num_beams: beam search is not available for encoder-decoder models yet; "
                      "use num_beams=1")
    if beams > 1:
        sampling = False  # beam search is deterministic (FT ignores top_k/top_p with beam_width > 1)
        _check_beams_fit(beams, prompt_tokens, max_new, *kv_cache)
    top_lps = p.top_log_probs if has("top_log_probs") else 0
    _range("top_log_probs", top_lps, 0, MAX_TOP_LOG_PROBS)
    if top_lps and beams > 1:
        raise invalid("parameter top_log_probs: not available with beam search (num_beams > 1)")
    for name in ("stop_token_sequences", "bad_word_token_sequences"):
        for seq in getattr(p, name):
            bad = [t for t in seq.token_ids if t >= vocab_size]
            if bad or not seq.token_ids:
                raise invalid(f"parameter {name}: token ids must be non-empty and < vocab_size {vocab_size}")
    try:
        grammar = from_parameters(p)
    except ConstraintError as e:
        raise invalid(str(e)) from None
    if grammar and beams > 1:
        raise invalid(f"parameter {p.WhichOneof('constraint')}: structured output is not available with beam "
                      f"search (num_beams {beams}); use num_beams=1")
    seed = p.seed if has("seed") else 0
    out = wpb.SamplingParams(
        max_new_tokens=max_new,
        temperature=temperature if sampling else 0.0,
        top_k=(top_k if top_k is not None else 0) if sampling else 1,
        top_p=top_p if sampling and top_p > 0 else 1.0,
        seed=seed,
        repetition_penalty=rep,
        presence_penalty=pres,
        frequency_penalty=freq,
        min_new_tokens=min_new,
        num_beams=beams,
        length_penalty=length_penalty,
        beam_search_diversity_rate=diversity,
        return_log_probs=p.return_log_probs or p.return_cum_log_probs or top_lps > 0,
        top_log_probs=top_lps,
        grammar=grammar,
    )
    if not p.ignore_eos:
        out.eos_token_ids.extend(eos_token_ids)
    for seq in p.stop_token_sequences:
        out.stop_token_sequences.add(token_ids=seq.token_ids)
    for seq in p.bad_word_token_sequences:
        out.bad_word_token_sequences.add(token_ids=seq.token_ids)
    for word in p.bad_words:
        ids = encode_plain(word)
        if ids:
            out.bad_word_token_sequences.add(token_ids=ids)
    return out
