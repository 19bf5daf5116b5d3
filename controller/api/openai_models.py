"""Request schemas of the OpenAI-compatible routes (pydantic), and their mapping onto the typed
GenerationParameters every other door uses (so validation past the schema is params.resolve's).

OpenAI's semantics where they differ from the FasterTransformer defaults of gRPC/SageMaker: sampling
at temperature 1 unless temperature is 0 (greedy); an absent seed is a fresh random one per request;
completions default to 16 new tokens. Extras as vLLM takes them: top_k (-1 or 0 = no limit),
repetition_penalty, min_tokens, ignore_eos, use_beam_search + best_of (beam width) + length_penalty.
Unknown fields are refused (400 naming them); fields OpenAI has that we cannot honour are refused with
the reason rather than silently dropped. Structured output: `response_format` ({"type": "json_schema",
"json_schema": {"name", "schema", "strict"}} or {"type": "json_object"}) and vLLM's guided_json,
guided_regex, guided_choice, guided_grammar (Lark), at most one of them; `check_constraint` compiles it
(controller/api/constraints.py) where the route tokenizes, so a bad one is a 400 naming its field.
"""

from __future__ import annotations

import json
import secrets
from typing import Annotated, Literal

import grpc
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from controller.api.constraints import ConstraintError, grammar_for
from controller.api.params import RequestError
from shardserve.v1 import generate_pb2 as gpb

MAX_N = 16  # samples per prompt
MAX_STOPS = 16
UINT64 = (1 << 64) - 1


def _response_format(v: dict | None) -> tuple[str, object] | None:
    """response_format -> (constraint kind, value), None for text; ValueError naming what is wrong."""
    kind = (v or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return "json_object", True
    if kind != "json_schema":
        raise ValueError(f"type must be \"text\", \"json_object\" or \"json_schema\", got {kind!r}")
    spec = v.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict | bool):
        raise ValueError("json_schema: expected {\"name\": ..., \"schema\": {...}, \"strict\": ...}")
    if "schema" not in spec:  # as vLLM: no schema is any JSON object
        return "json_object", True
    return "json_schema", json.dumps(spec["schema"])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's; accepted, not used


class _Common(_Strict):
    model: str | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    user: str | None = None  # accepted and ignored
    logit_bias: dict[str, float] | None = None
    # extras (vLLM's names)
    top_k: Annotated[int, Field(ge=-1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=100.0)] | None = None
    min_tokens: Annotated[int, Field(ge=0)] = 0
    ignore_eos: bool = False
    use_beam_search: bool = False
    best_of: Annotated[int, Field(ge=1, le=16)] | None = None
    length_penalty: Annotated[float, Field(ge=-10.0, le=10.0)] | None = None
    # structured output (OpenAI's response_format; vLLM's guided_* extras)
    response_format: dict | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Field(min_length=1)] | None = None
    guided_grammar: str | None = None
    # accepted, no effect here
    service_tier: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if isinstance(v, list) and len(v) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v):
        if v:
            raise ValueError("logit_bias is not supported")
        return v

    @field_validator("response_format")
    @classmethod
    def _format(cls, v):
        _response_format(v)  # its shape; the schema itself is compiled in check_constraint, off the event loop
        return v

    def constraint(self) -> tuple[str, str, object] | None:
        """(the field it came from, constraint kind, value), or None."""
        given = []
        fmt = _response_format(self.response_format)
        if fmt is not None:
            given.append(("response_format", *fmt))
        if self.guided_json is not None:
            v = self.guided_json
            given.append(("guided_json", "json_schema", v if isinstance(v, str) else json.dumps(v)))
        for name, kind in (("guided_regex", "regex"), ("guided_choice", "choice"), ("guided_grammar", "grammar")):
            if getattr(self, name) is not None:
                given.append((name, kind, getattr(self, name)))
        if len(given) > 1:
            raise ValueError(f"{given[1][0]}: give one of response_format, guided_json, guided_regex, "
                             f"guided_choice, guided_grammar (also got {given[0][0]})")
        return given[0] if given else None

    def check_constraint(self) -> None:
        """Compile the constraint (cached, so the request's resolve finds it done); RequestError naming
        the field it came from."""
        c = self.constraint()
        if c is not None:
            try:
                grammar_for(c[1], c[2])
            except ConstraintError as e:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"field {c[0]}: {e.detail}") from None

    @model_validator(mode="after")
    def _beams(self):
        c = self.constraint()
        if c is not None and self.use_beam_search:
            raise ValueError(f"{c[0]}: structured output is not available with beam search")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed with stream: true")
        if self.best_of is not None and self.best_of > 1 and not self.use_beam_search:
            raise ValueError("best_of: > 1 needs use_beam_search: true (it is the beam width)")
        if self.use_beam_search and self.n != 1:
            raise ValueError("n: beam search returns one sequence (the best beam); use n: 1")
        return self

    def max_new(self) -> int | None:
        return None

    def parameters(self, logprobs: bool) -> tuple[gpb.GenerationParameters, bool]:
        """(the typed parameters of the first sample, whether samples differ by seed)."""
        p = gpb.GenerationParameters()
        mx = self.max_new()
        if mx is not None:
            p.max_new_tokens = mx
        if self.use_beam_search:
            p.num_beams = self.best_of or 2
            if self.length_penalty is not None:
                p.length_penalty = self.length_penalty
        temperature = 1.0 if self.temperature is None else self.temperature
        p.do_sample = temperature > 0 and not self.use_beam_search
        if p.do_sample:
            p.temperature = temperature
            if self.top_p is not None:
                p.top_p = self.top_p
            if self.top_k is not None:
                p.top_k = max(self.top_k, 0)  # vLLM's -1 = no limit
        p.seed = (self.seed & UINT64) if self.seed is not None else secrets.randbits(63)
        if self.presence_penalty:
            p.presence_penalty = self.presence_penalty
        if self.frequency_penalty:
            p.frequency_penalty = self.frequency_penalty
        if self.repetition_penalty is not None:
            p.repetition_penalty = self.repetition_penalty
        if self.min_tokens:
            p.min_new_tokens = self.min_tokens
        if self.stop:
            p.stop.extend([self.stop] if isinstance(self.stop, str) else self.stop)
        p.ignore_eos = self.ignore_eos
        if logprobs:
            p.return_log_probs = True
            if self.top_alternatives():
                p.top_log_probs = self.top_alternatives()
        c = self.constraint()
        if c is not None:
            _, kind, value = c
            if kind == "choice":
                p.choice.choices.extend(value)
            else:
                setattr(p, kind, value)
        return p, p.do_sample

    def top_alternatives(self) -> int:
        """How many most likely tokens each position's log-probs list (0 = only the chosen one)."""
        return 0

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("must not be empty")
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v):
        if v:
            raise ValueError("suffix is not supported")
        return v

    def max_new(self) -> int | None:
        return self.max_tokens

    def top_alternatives(self) -> int:
        return self.logprobs or 0

    def prompts(self) -> list[str | list[int]]:
        v = self.prompt
        if isinstance(v, str):
            return [v]
        if all(isinstance(x, int) for x in v):
            return [list(v)]
        return list(v)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatRequest(_Common):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    add_generation_prompt: bool = True  # vLLM's extra
    tools: list | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v, info):
        if v and not info.data.get("logprobs"):  # logprobs is declared (so validated) before it
            raise ValueError("needs logprobs: true")
        return v

    def top_alternatives(self) -> int:
        return self.top_logprobs or 0

    @field_validator("tools")
    @classmethod
    def _tools(cls, v):
        if v:
            raise ValueError("tool calling is not supported")
        return v

    def max_new(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def conversation(self) -> list[dict]:
        out = []
        for m in self.messages:
            d = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.name:
                d["name"] = m.name
            out.append(d)
        return out
