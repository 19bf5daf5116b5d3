"""The benchmark workload and its measurements: N concurrent streams, all arriving at t=0, each
a prompt of ~P tokens asking for exactly T new tokens (eos ignored), identical token ids for
every system (the prompts are cut from the OS licence texts and encoded by the model's tokenizer)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workload:
    streams: int = 32
    prompt_tokens: int = 128
    new_tokens: int = 128
    # timed rounds per system, each on prompts of its own (no prefix-cache hits across rounds); the
    # round with the median tokens/s is the system's result (short runs are noisy)
    rounds: int = 1


@dataclass
class Result:
    system: str  # shardserve | transformers | ctranslate2
    model: str
    scenario: str
    tokens_per_s: float  # generated tokens / wall seconds, whole scenario
    ttft_p50_s: float  # time to first token from arrival (t=0); non-streaming systems: the full latency
    latency_p50_s: float  # arrival -> last token
    latency_p90_s: float
    latency_p99_s: float
    requests: int = 0
    note: str = ""
    ttft_p99_s: float | None = None
    inter_token_p50_s: float | None = None  # streaming systems only: gap between a stream's tokens

    def public(self) -> dict:
        keys = ("system", "model", "scenario", "tokens_per_s", "ttft_p50_s", "latency_p50_s", "latency_p90_s",
                "latency_p99_s", "ttft_p99_s", "inter_token_p50_s", "note")
        return {k: getattr(self, k) for k in keys}


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank-interpolated percentile, q in [0, 100]."""
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(sorted(xs), n=100, method="inclusive")[max(0, min(98, round(q) - 1))]


def make_result(system, model, scenario, wall_s, generated, ttfts, latencies, note="") -> Result:
    return Result(system, model, scenario, generated / wall_s, percentile(ttfts, 50), percentile(latencies, 50),
                  percentile(latencies, 90), percentile(latencies, 99), len(latencies), note,
                  ttft_p99_s=percentile(ttfts, 99))


def median_round(results: list[Result]) -> Result:
    """The round with the median tokens/s (the lower middle one of an even count), noting how many ran."""
    if len(results) == 1:
        return results[0]
    ranked = sorted(results, key=lambda r: r.tokens_per_s)
    best = ranked[(len(ranked) - 1) // 2]
    spread = f"median of {len(results)} rounds ({ranked[0].tokens_per_s:.0f}-{ranked[-1].tokens_per_s:.0f} tok/s)"
    best.note = f"{best.note}; {spread}" if best.note else spread
    return best


def round_prompts(model_dir: Path, work: Workload) -> list[list[tuple[str, list[int]]]]:
    """`work.rounds` sets of `work.streams` prompts, all different (consecutive corpus passages)."""
    ps = prompts(model_dir, Workload(streams=work.streams * work.rounds, prompt_tokens=work.prompt_tokens))
    return [ps[i * work.streams:(i + 1) * work.streams] for i in range(work.rounds)]


def prompts(model_dir: Path, work: Workload) -> list[tuple[str, list[int]]]:
    """(text, token ids as the server's Codec encodes it) per stream; ids ~ work.prompt_tokens long."""
    from controller.acquire.demo_model import corpus_lines
    from controller.tokenizer import Codec

    codec = Codec(model_dir)
    text = " ".join(corpus_lines())
    out = []
    pos = 0
    for _ in range(work.streams):
        chunk = text[pos: pos + 8 * work.prompt_tokens]
        ids = codec.encode_plain(chunk)[: work.prompt_tokens - 1]
        prompt = codec.decode(ids)
        out.append((prompt, codec.encode(prompt)))
        pos += 8 * work.prompt_tokens
    return out


def format_table(results: list[Result]) -> str:
    head = (f"{'system':<13}{'model':<12}{'scenario':<31}{'tok/s':>8}{'TTFT p50':>10}{'TTFT p99':>10}"
            f"{'ITL p50 ms':>11}{'lat p50':>9}{'p90':>9}{'p99':>9}")
    lines = [head, "-" * len(head)]
    for r in results:
        itl = f"{1e3 * r.inter_token_p50_s:.0f}" if r.inter_token_p50_s else "-"
        lines.append(f"{r.system:<13}{r.model:<12}{r.scenario:<31}{r.tokens_per_s:>8.1f}{r.ttft_p50_s:>10.2f}"
                     f"{r.ttft_p99_s if r.ttft_p99_s is not None else r.ttft_p50_s:>10.2f}{itl:>11}"
                     f"{r.latency_p50_s:>9.2f}{r.latency_p90_s:>9.2f}{r.latency_p99_s:>9.2f}")
    return "\n".join(lines)
