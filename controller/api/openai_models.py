"""Request schemas of the OpenAI-compatible routes (pydantic), and their mapping onto the typed
GenerationParameters every other door uses (so validation past the schema is params.resolve's).

OpenAI's semantics where they differ from the FasterTransformer defaults of gRPC/SageMaker: sampling
at temperature 1 unless temperature is 0 (greedy); an absent seed is a fresh random one per request;
completions default to 16 new tokens. Extras as vLLM takes them: top_k (-1 or 0 = no limit),
repetition_penalty, min_tokens, ignore_eos, use_beam_search + best_of (beam width) + length_penalty.
Unknown fields are refused (400 naming them); fields OpenAI has that we cannot honour are refused with
the reason rather than silently dropped.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shardserve.v1 import generate_pb2 as gpb

MAX_N = 16  # samples per prompt
MAX_STOPS = 16
UINT64 = (1 << 64) - 1


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

    @model_validator(mode="after")
    def _beams(self):
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
    response_format: dict | None = None
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

    @field_validator("response_format")
    @classmethod
    def _format(cls, v):
        if v and v.get("type") not in (None, "text"):
            raise ValueError("only {\"type\": \"text\"} is supported (no structured output yet)")
        return v

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
