"""Structured output, the controller's half: a request's constraint -> one llguidance grammar,
validated at request time (no tokenizer and no torch needed), so a bad schema, regex or grammar is
INVALID_ARGUMENT naming the field before any work starts. The worker compiles the same grammar
against the model's tokenizer (worker/engine/constraints.py).

Kinds (the `constraint` oneof of GenerationParameters):
- json_schema: JSON Schema text; whitespace is fixed (no free whitespace; ", " between items and
  ": " after keys, as json.dumps writes them) whatever the schema's "x-guidance" says, so a weak model
  cannot loop on spaces and newlines;
- json_object: any JSON object, same whitespace;
- regex: the whole output matches (llguidance's regex dialect: Rust's `regex` syntax);
- choice: exactly one of a list of strings;
- grammar: a Lark grammar in llguidance's dialect (`start` is the start rule).
"""

from __future__ import annotations

import functools
import json

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
JSON_WHITESPACE = {"whitespace_flexible": False, "whitespace_pattern": None, "item_separator": ", ",
                   "key_separator": ": "}
CACHE_SIZE = 256  # distinct constraints kept validated
CACHE_MAX_BYTES = 64 << 10  # larger constraints are validated every time instead of kept


class ConstraintError(ValueError):
    """A constraint the library refuses; `field` names it for the client."""

    def __init__(self, field: str, message: str):
        super().__init__(f"parameter {field}: {message}")
        self.field = field
        self.detail = message


def _matcher():
    from llguidance import LLMatcher  # imported on the first constrained request (no torch)

    return LLMatcher


@functools.lru_cache(maxsize=CACHE_SIZE)
def _grammar(kind: str, value: str) -> str:
    M = _matcher()
    try:
        if kind == "json_schema":
            schema = json.loads(value)
            if not isinstance(schema, dict | bool):
                raise ConstraintError(kind, "a JSON Schema is an object (or true/false)")
            grammar = M.grammar_from_json_schema(value, overrides=JSON_WHITESPACE)
        elif kind == "json_object":
            grammar = M.grammar_from_json_schema({"type": "object"}, overrides=JSON_WHITESPACE)
        elif kind == "regex":
            grammar = M.grammar_from_regex(value)
        elif kind == "choice":
            choices = json.loads(value)
            if not choices or not all(isinstance(c, str) and c for c in choices):
                raise ConstraintError(kind, "a non-empty list of non-empty strings")
            grammar = M.grammar_from_lark("start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices))
        elif kind == "grammar":
            grammar = M.grammar_from_lark(value)
        else:
            raise ConstraintError("constraint", f"unknown kind {kind!r}; known: {', '.join(KINDS)}")
    except ValueError as e:  # json.JSONDecodeError too
        if isinstance(e, ConstraintError):
            raise
        raise ConstraintError(kind, f"not valid JSON: {e}") from None
    err = M.validate_grammar(grammar)
    if err:
        raise ConstraintError(kind, err.strip().splitlines()[0] if kind != "grammar" else err.strip())
    return grammar


def grammar_for(kind: str, value: str | list[str] | bool) -> str:
    """The llguidance grammar of a constraint (cached per distinct constraint). Raises ConstraintError."""
    if kind == "choice":
        value = json.dumps(list(value))
    elif kind == "json_object":
        value = ""
    if len(value) > CACHE_MAX_BYTES:
        return _grammar.__wrapped__(kind, value)
    return _grammar(kind, value)


def from_parameters(p) -> str:
    """GenerationParameters' constraint oneof -> its grammar ("" when unconstrained)."""
    kind = p.WhichOneof("constraint")
    if kind is None or (kind == "json_object" and not p.json_object):
        return ""
    value = getattr(p, kind)
    return grammar_for(kind, list(value.choices) if kind == "choice" else value)
