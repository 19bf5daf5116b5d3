"""Text <-> token ids, in the controller only. Workers never see text.

`IncrementalDetokenizer` turns a stream of ids into text pieces whose concatenation is the
output text: multi-byte characters are held until complete and leading spaces come out right,
because each piece is the difference between decoding a short window with and without the new
tokens (the window starts a few tokens back, inside the prompt for the first piece).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class Codec:
    """The model's own tokenizer (no remote code) plus the ids generation stops on.

    `background=True` reads it on a thread of its own (importing transformers takes seconds) while the
    caller goes on, e.g. to start the workers; the first use of `tok`, `eos_token_ids` or `vocab_size`
    (and every method) waits for it, and `wait()` raises what the read raised."""

    _LAZY = frozenset({"tok", "eos_token_ids", "vocab_size", "_rust_decode"})

    def __init__(self, model_dir: Path, background: bool = False, first=None):
        """`first`: called just before the read, on the same thread (it shares the transformers import)."""
        self._loaded = threading.Event()
        self._error: BaseException | None = None
        if not background:
            if first is not None:
                first()
            self._load(model_dir)
            return

        def run():
            try:
                if first is not None:
                    first()
                self._load(model_dir)
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits
                self._error = e
            finally:
                self._loaded.set()

        threading.Thread(target=run, daemon=True, name="read-tokenizer").start()

    def wait(self) -> Codec:
        self._loaded.wait()
        if self._error is not None:
            raise self._error
        return self

    def __getattr__(self, name: str):
        # only reached while a background read has not set the attribute yet
        if name in Codec._LAZY:
            self.wait()
            return object.__getattribute__(self, name)
        raise AttributeError(name)

    def _load(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
        self.eos_token_ids = tuple(sorted(_eos_ids(Path(model_dir), self.tok)))
        self.vocab_size = len(self.tok)
        # The Rust tokenizer's own decode when transformers' decode would only wrap it (a fast tokenizer
        # whose _decode is the base one; no clean-up asked for): the same text without the Python
        # argument handling around it (27 us against 59 us for a 7-token window, measured).
        backend = getattr(self.tok, "_tokenizer", None)
        base = _base_fast_decode()
        self._rust_decode = (backend.decode if backend is not None and base is not None
                             and type(self.tok)._decode is base else None)
        self._loaded.set()

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=True)["input_ids"])

    def encode_plain(self, text: str) -> list[int]:
        """Without special tokens: for stop and bad-word sequences."""
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        if self._rust_decode is not None:
            return self._rust_decode(ids, skip_special_tokens=True)
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _base_fast_decode():
    """transformers' fast-tokenizer `_decode` (the class moved between versions), or None."""
    for mod, cls in (("transformers.tokenization_utils_tokenizers", "TokenizersBackend"),
                     ("transformers.tokenization_utils_fast", "PreTrainedTokenizerFast")):
        try:
            return getattr(__import__(mod, fromlist=[cls]), cls)._decode
        except (ImportError, AttributeError):
            continue
    return None


def _eos_ids(model_dir: Path, tok) -> set[int]:
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if isinstance(eos, int):
                ids.add(eos)
            elif isinstance(eos, list):
                ids.update(int(e) for e in eos)
            if ids:
                break
    if not ids and tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    return ids


class IncrementalDetokenizer:
    WINDOW = 6  # tokens of context kept before the unread part

    def __init__(self, codec: Codec, prompt_ids: list[int]):
        self.codec = codec
        self.ids = list(prompt_ids[-self.WINDOW:])
        self.prefix = 0
        self.read = len(self.ids)

    def push(self, new_ids: list[int]) -> str:
        """Text completed by these ids ('' while a character is still incomplete)."""
        self.ids.extend(new_ids)
        return self._emit(force=False)

    def flush(self) -> str:
        """Whatever is left at the end (an incomplete character comes out as U+FFFD)."""
        return self._emit(force=True)

    def _emit(self, force: bool) -> str:
        before = self.codec.decode(self.ids[self.prefix:self.read])
        after = self.codec.decode(self.ids[self.prefix:])
        if len(after) > len(before) and (force or not after.endswith("\ufffd")):
            piece = after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
            return piece
        return ""


class StopStrings:
    """Holds back text that could be the start of a stop string; cuts at the first match."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.matched = False

    def feed(self, piece: str) -> str:
        """Text safe to emit now. After a match, `matched` is True and nothing more comes out."""
        if not self.stops:
            return piece
        text = self.pending + piece
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.matched = True
            self.pending = ""
            return text[:cut]
        hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.pending = text[len(text) - hold:] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
