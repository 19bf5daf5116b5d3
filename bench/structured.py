"""Structured output: xgrammar, llguidance and outlines-core side by side, on the same tokenizers.

    python -m bench.structured [--batch 32] [--steps 96] [--threads 1,2] [--out bench/results/structured.json]

For each library and each vocabulary (the demo model's 4k byte-level BPE, and a 128k byte-level
BPE trained offline on local text: the licence texts plus the Python standard library's sources,
cached in ~/.cache/shardserve/bench/), it measures:

- compile: a medium JSON schema (nested object, array of objects with bounds, enums, integer
  ranges, patterned strings) into the library's matcher state, cold (no library cache; xgrammar
  compiles on the row's threads, the others on one); for the
  lazy ones (llguidance) also the first mask, which is where their remaining work happens;
- mask per step at batch `--batch` (the libraries interleaved step by step, so load from other
  processes falls on all alike): `--batch` matchers, each forced through the tokens of its own
  valid instance of the schema (json.dumps, ", " and ": " separators; the same token sequences for
  every library), the step's bitmask [batch, ceil(V/32)] filled with the library's batched call
  (xgrammar BatchGrammarMatcher, llguidance LLExecutor; outlines-core has none: one
  write_mask_into per row), then every matcher advanced by its row's token; median and p90 of the
  fill, and the advance, per step, at each thread count;
- apply: the bitmask applied to fp32 logits [batch, V] with torch (the engine's own function,
  worker/engine/constraints.py, library-independent);
- engine: the demo model's engine in-process at batch `--batch`, every row unconstrained or every row
  under the schema (llguidance, as served), rounds alternating: ms per step and the ratio.

The whole run takes about two minutes on 2 busy cores (outlines-core's 128k index is most of it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CACHE = Path.home() / ".cache" / "shardserve" / "bench"

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 99999},
        "name": {"type": "string", "pattern": "^[A-Z][a-z]{2,11}$"},
        "email": {"type": "string", "pattern": "^[a-z]{3,10}@[a-z]{3,8}\\.(com|org|net)$"},
        "role": {"enum": ["admin", "editor", "viewer", "guest"]},
        "active": {"type": "boolean"},
        "score": {"type": "number"},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string", "maxLength": 24},
                "city": {"type": "string", "maxLength": 16},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 1, "maxItems": 4},
        "orders": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 100},
                    "status": {"enum": ["pending", "shipped", "delivered"]},
                },
                "required": ["sku", "quantity", "status"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["id", "name", "email", "role", "active", "score", "address", "tags", "orders"],
    "additionalProperties": False,
}


def instance(rng: random.Random) -> dict:
    """A valid instance of SCHEMA with every property, in schema order."""
    low = "abcdefghijklmnopqrstuvwxyz"
    word = lambda a, b: "".join(rng.choice(low) for _ in range(rng.randint(a, b)))  # noqa: E731
    return {
        "id": rng.randint(1, 99999),
        "name": word(1, 1).upper() + word(2, 11),
        "email": f"{word(3, 10)}@{word(3, 8)}.{rng.choice(['com', 'org', 'net'])}",
        "role": rng.choice(["admin", "editor", "viewer", "guest"]),
        "active": rng.random() < 0.5,
        "score": round(rng.uniform(-100, 100), rng.randint(0, 3)),
        "address": {"street": f"{rng.randint(1, 999)} {word(3, 10).title()} St", "city": word(3, 12).title(),
                    "zip": f"{rng.randint(0, 99999):05d}"},
        "tags": [word(2, 8) for _ in range(rng.randint(1, 4))],
        "orders": [{"sku": f"{word(3, 3).upper()}-{rng.randint(0, 9999):04d}", "quantity": rng.randint(1, 100),
                    "status": rng.choice(["pending", "shipped", "delivered"])} for _ in range(rng.randint(1, 3))],
    }


# ---- tokenizers ------------------------------------------------------------------------------
def _corpus(max_bytes: int):
    """The licence texts, then Python sources (the standard library, then the installed packages')."""
    from controller.acquire.demo_model import corpus_lines

    yield from corpus_lines()
    seen = 0
    stdlib = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    for root in (stdlib, site):
        for f in sorted(root.rglob("*.py")):
            if seen > max_bytes:
                return
            if "test" in f.parts or "tests" in f.parts:
                continue
            text = f.read_text(errors="replace")
            seen += len(text)
            yield from (line for line in text.splitlines() if line.strip())


def tokenizer_128k(vocab: int = 128000):
    """A byte-level BPE of `vocab` tokens trained on local text, built once into CACHE."""
    from transformers import PreTrainedTokenizerFast

    out = CACHE / f"bpe-{vocab // 1000}k-v2"
    if not (out / "tokenizer.json").is_file():
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        t0 = time.perf_counter()
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"], min_frequency=1,
                                      show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(_corpus(64 << 20), trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
        out.mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(str(out))
        print(f"trained a {len(fast)}-token BPE in {time.perf_counter() - t0:.1f} s -> {out}", flush=True)
    return PreTrainedTokenizerFast.from_pretrained(str(out))


def tokenizer_demo():
    from transformers import PreTrainedTokenizerFast

    from controller.acquire.demo_model import DEMO_VERSION, build_tokenizer

    out = CACHE / f"tok-{DEMO_VERSION}"
    if not (out / "tokenizer.json").is_file():
        build_tokenizer(out)
    return PreTrainedTokenizerFast.from_pretrained(str(out))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what ByteLevel pre-tokenizers write)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def token_bytes(tok) -> list[bytes]:
    """Each id's bytes (byte-level BPE: the printable alias of every byte mapped back)."""
    back = {c: b for b, c in _bytes_to_unicode().items()}
    special = set(tok.all_special_tokens)
    out = []
    for t in tok.convert_ids_to_tokens(list(range(len(tok)))):
        out.append(t.encode() if t in special else bytes(back[c] for c in t))
    return out


# ---- libraries -------------------------------------------------------------------------------
class XGrammar:
    name = "xgrammar"

    def __init__(self, tok, threads: int):
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
        self.threads = threads
        self.batch = xgr.BatchGrammarMatcher(max_threads=threads)

    def compile(self, schema: dict):
        compiler = self.xgr.GrammarCompiler(self.info, max_threads=self.threads, cache_enabled=False)
        return compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matchers, bitmask) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def advance(self, matchers, tokens) -> list[bool]:
        return self.batch.batch_accept_token(matchers, tokens)


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok, threads: int):
        import llguidance
        import llguidance.hf

        self.ll = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(tok, n_vocab=len(tok))
        self.executor = llguidance.LLExecutor(num_threads=threads)

    def compile(self, schema: dict):
        LLMatcher = self.ll.LLMatcher
        grammar = LLMatcher.grammar_from_json_schema(
            schema, overrides={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        m = LLMatcher(self.tokenizer, grammar, log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def matcher(self, compiled):
        return compiled.deep_copy()

    def fill(self, matchers, bitmask) -> None:
        self.executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bitmask.data_ptr(),
                                              bitmask.shape[1] * 4, bitmask.shape[0])

    def advance(self, matchers, tokens) -> list[bool]:
        return self.executor.consume_token_par(list(zip(matchers, tokens)))


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok, threads: int):
        import outlines_core as oc

        self.oc = oc
        by: dict[bytes, list[int]] = {}
        for i, b in enumerate(token_bytes(tok)):
            if i != tok.eos_token_id:
                by.setdefault(b, []).append(i)
        self.vocab = oc.Vocabulary(tok.eos_token_id, by)

    def compile(self, schema: dict):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema), r"[ ]?")
        return self.oc.Index(regex, self.vocab)

    def matcher(self, compiled):
        return self.oc.Guide(compiled)

    def fill(self, matchers, bitmask) -> None:
        row = bitmask.shape[1]
        for i, g in enumerate(matchers):
            g.write_mask_into(bitmask[i].data_ptr(), row, 4)

    def advance(self, matchers, tokens) -> list[bool]:
        ok = []
        for g, t in zip(matchers, tokens):
            try:
                g.advance(t, return_tokens=False)
                ok.append(True)
            except ValueError:
                ok.append(False)
        return ok


LIBRARIES = {"xgrammar": XGrammar, "llguidance": LLGuidance, "outlines-core": OutlinesCore}


# ---- measurement -----------------------------------------------------------------------------
def _ms(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"p50_ms": 1e3 * statistics.median(xs), "p90_ms": 1e3 * xs[int(0.9 * (len(xs) - 1))],
            "mean_ms": 1e3 * statistics.fmean(xs)}


class Run:
    """One library (at one thread count) on one vocabulary: its compiled schema and `batch` rows, each
    a matcher forced through the tokens of its own instance of the schema."""

    def __init__(self, lib, tok, batch: int, docs: list[list[int]]):
        import torch

        self.lib, self.docs, self.queue = lib, docs, list(docs)
        self.bitmask = torch.full((batch, (len(tok) + 31) // 32), -1, dtype=torch.int32, device="cpu")
        self.compile_s: list[float] = []
        for _ in range(1 if lib.name == "outlines-core" else 2):  # cold each time (no library cache)
            t0 = time.perf_counter()
            self.compiled = lib.compile(SCHEMA)
            self.compile_s.append(time.perf_counter() - t0)
        first = lib.matcher(self.compiled)
        t0 = time.perf_counter()
        lib.fill([first], self.bitmask[:1])
        self.first_mask_s = time.perf_counter() - t0
        self.rows = [self._fresh() for _ in range(batch)]
        self.fills: list[float] = []
        self.advances: list[float] = []
        self.rejected = self.masked_off = 0

    def _fresh(self) -> list:
        self.queue = self.queue or list(self.docs)
        return [self.lib.matcher(self.compiled), self.queue.pop(), 0]

    def step(self) -> None:
        matchers = [r[0] for r in self.rows]
        t0 = time.perf_counter()
        self.lib.fill(matchers, self.bitmask)
        self.fills.append(time.perf_counter() - t0)
        tokens = [r[1][r[2]] for r in self.rows]
        words = self.bitmask.tolist()
        self.masked_off += sum(not (words[k][t // 32] >> (t % 32)) & 1 for k, t in enumerate(tokens))
        t0 = time.perf_counter()
        ok = self.lib.advance(matchers, tokens)
        self.advances.append(time.perf_counter() - t0)
        for k, r in enumerate(self.rows):
            r[2] += 1
            self.rejected += not ok[k]
            if r[2] == len(r[1]) or not ok[k]:  # this instance is done: the next one, on a fresh matcher
                self.rows[k] = self._fresh()

    def result(self) -> dict:
        return {"compile_s": statistics.median(self.compile_s), "compile_runs_s": self.compile_s,
                "first_mask_ms": 1e3 * self.first_mask_s, "fill": _ms(self.fills), "advance": _ms(self.advances),
                "tokens_rejected": self.rejected, "tokens_masked_off": self.masked_off}


def measure_apply(V: int, batch: int, reps: int = 30) -> dict:
    import torch

    from worker.engine.constraints import apply_bitmask

    g = torch.Generator(device="cpu").manual_seed(0)
    logits = torch.randn(batch, V, generator=g, device="cpu")
    bitmask = torch.randint(-(1 << 31), (1 << 31) - 1, (batch, (V + 31) // 32), generator=g, dtype=torch.int32,
                            device="cpu")
    rows = torch.arange(batch, device="cpu")
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        apply_bitmask(logits.clone(), rows, bitmask)
        times.append(time.perf_counter() - t0)
    return _ms(times)


def measure_engine(batch: int, new: int, rounds: int) -> dict:
    """The demo model's engine in-process: `batch` requests of `new` tokens (greedy, no EOS), all
    unconstrained or all under SCHEMA (none completes it in `new` tokens, so both run every step at
    full batch); rounds alternate. ms per engine step (prefill included) and the ratio."""
    from bench import models
    from controller.api.constraints import grammar_for
    from worker.engine.build import build_engine
    from worker.engine.constraints import Grammars
    from worker.engine.engine import EngineConfig
    from worker.engine.sequence import Sampling

    model_dir = models.demo(CACHE)
    engine = build_engine(EngineConfig(model_dir=model_dir, max_batch_size=batch, max_model_len=256,
                                       kv_cache_bytes=256 << 20))
    grammars = Grammars(model_dir, engine.runner.vocab_size)
    grammar = grammar_for("json_schema", json.dumps(SCHEMA))
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(3, 4096) for _ in range(15)] for _ in range(batch)]
    times: dict[str, list[float]] = {"plain": [], "constrained": []}
    for r in range(2 * rounds + 1):
        kind = "constrained" if r % 2 else "plain"
        done = []
        for i, p in enumerate(prompts):
            seq = engine.new_sequence(f"{kind}-{r}-{i}", p, Sampling(max_new_tokens=new),
                                      emit=lambda t, lp, fin, err, done=done: fin is not None and done.append(fin))
            if kind == "constrained":
                seq.matcher = grammars.matcher(grammar)
            engine.add(seq)
        steps, t0 = 0, time.perf_counter()
        while len(done) < batch:
            engine.step()
            steps += 1
        if r:  # the first round warms up
            times[kind].append(1e3 * (time.perf_counter() - t0) / steps)
    plain, cons = statistics.median(times["plain"]), statistics.median(times["constrained"])
    return {"batch": batch, "new_tokens": new, "rounds": rounds, "step_ms_plain": plain,
            "step_ms_constrained": cons, "ratio": cons / plain, "runs_ms": times}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.structured", description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=96)
    ap.add_argument("--threads", default="1,2", help="thread counts for the batched mask calls")
    ap.add_argument("--libraries", default=",".join(LIBRARIES))
    ap.add_argument("--vocab", type=int, default=128000, help="size of the large vocabulary")
    ap.add_argument("--out", type=Path, default=Path("bench/results/structured.json"))
    ap.add_argument("--engine-only", action="store_true", help="only the in-process engine rows")
    ap.add_argument("--engine-rounds", type=int, default=3)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    engine = measure_engine(a.batch, 32, a.engine_rounds)
    print(f"engine step, demo model, batch {a.batch}: {engine['step_ms_plain']:.1f} ms unconstrained, "
          f"{engine['step_ms_constrained']:.1f} ms with every row under the schema ({engine['ratio']:.2f}x)",
          flush=True)
    toks = {} if a.engine_only else {"demo": tokenizer_demo(), f"bpe{a.vocab // 1000}k": tokenizer_128k(a.vocab)}
    results, rows = [], []
    for vname, tok in toks.items():
        apply = measure_apply(len(tok), a.batch)
        print(f"[{vname}] V={len(tok)} apply bitmask to logits [{a.batch}, V]: p50 {apply['p50_ms']:.3f} ms",
              flush=True)
        rng = random.Random(0)
        docs = [tok(json.dumps(instance(rng)), add_special_tokens=False)["input_ids"] for _ in range(4 * a.batch)]
        runs = {}
        for lname in a.libraries.split(","):
            for threads in [int(t) for t in a.threads.split(",")]:
                if lname == "outlines-core" and threads != 1:
                    continue  # no batched call: one thread
                meta = dict(library=lname, vocab=vname, vocab_size=len(tok), threads=threads, batch=a.batch,
                            apply=apply)
                t0 = time.perf_counter()
                try:
                    lib = LIBRARIES[lname](tok, threads)
                    meta["tokenizer_setup_s"] = time.perf_counter() - t0
                    runs[(lname, threads)] = (Run(lib, tok, a.batch, docs), meta)
                except Exception as e:  # noqa: BLE001 - a library that fails is a row saying so
                    rows.append({**meta, "error": f"{type(e).__name__}: {e}"})
                print(f"  set up {lname} x{threads} in {time.perf_counter() - t0:.1f} s", flush=True)
        for _ in range(a.steps):  # interleaved step by step: load from elsewhere falls on all alike
            for run, _meta in runs.values():
                run.step()
        for run, meta in runs.values():
            rows.append({**meta, **run.result()})
    results = rows
    for r in rows:
        print(json.dumps(r), flush=True)
    print()
    print(f"| library | vocab | threads | tokenizer setup s | compile ms | first mask ms | mask fill / step "
          f"p50 ms (batch {a.batch}) | p90 ms | advance / step p50 ms | apply p50 ms |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "error" in r:
            print(f"| {r['library']} | {r['vocab']} | {r['threads']} | | error: {r['error'][:60]} | | | | | |")
            continue
        print(f"| {r['library']} | {r['vocab']} ({r['vocab_size']}) | {r['threads']} | {r['tokenizer_setup_s']:.2f} | "
              f"{1e3 * r['compile_s']:.1f} | {r['first_mask_ms']:.2f} | {r['fill']['p50_ms']:.3f} | "
              f"{r['fill']['p90_ms']:.3f} | {r['advance']['p50_ms']:.3f} | {r['apply']['p50_ms']:.3f} |")
    meta = {"host": platform.node(), "cpus": os.cpu_count(), "loadavg": os.getloadavg(), "engine": engine,
            "versions": _versions(), "schema": SCHEMA, "batch": a.batch, "steps": a.steps}
    if a.engine_only and a.out == Path("bench/results/structured.json"):
        a.out = Path("bench/results/structured-engine.json")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(f"\nwrote {a.out}")
    return 0


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("xgrammar", "llguidance", "outlines-core", "torch", "tokenizers"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


if __name__ == "__main__":
    sys.exit(main())
