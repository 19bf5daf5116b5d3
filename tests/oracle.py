"""Helpers shared by the parity tests: run our engine in-process and transformers on the same
weights, greedy, and return tokens and per-step logits of both."""

from __future__ import annotations

from pathlib import Path

import torch

from worker.engine.build import build_engine
from worker.engine.engine import EngineConfig
from worker.engine.sequence import Sampling

# Tiny models: one intra-op thread is fastest and keeps timing stable on a busy 2-core machine.
torch.set_num_threads(1)


def hf_auto_class(config):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


def make_random_model(config, out: Path, seed: int = 0, std: float = 0.08, model_cls=None,
                      max_shard_size=None) -> Path:
    """Save a random model built from a transformers config class, weights drawn wide enough
    that greedy outputs do not collapse into one repeated token. Norm weights ~ N(1, 0.1)."""
    torch.manual_seed(seed)
    model = (model_cls or hf_auto_class(config)).from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = any(k in name for k in ("norm", "ln_", "ln.", "layernorm"))
            if p.dim() == 1 and is_norm and name.endswith("weight"):
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, std)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(out), safe_serialization=True, **kw)
    return out


def run_ours(model_dir: Path, prompts: list[list[int]], max_new_tokens: int, **engine_kw):
    """All prompts batched together in one engine; returns (tokens, logits) per prompt,
    logits as [steps, vocab] fp32. Encoder-decoder models: prompts feed the encoder."""
    engine = build_engine(EngineConfig(model_dir=Path(model_dir), **engine_kw))
    return run_engine(engine, prompts, max_new_tokens)


class RecordingSampler:
    """Wraps an engine's sampler so a test sees every (sequences, logits [S, vocab]) it samples
    (production code keeps no hook; beam rows are not sampled here)."""

    def __init__(self, inner, hook):
        self.inner, self.hook, self.counts = inner, hook, inner.counts

    def __call__(self, logits, seqs):
        self.hook(seqs, logits)
        return self.inner(logits, seqs)


def record_logits(engine, hook) -> None:
    """Tests: call hook(sampled sequences, their logits) before the engine samples them."""
    engine.sampler = RecordingSampler(engine.sampler, hook)


def run_engine(engine, prompts: list[list[int]], max_new_tokens: int):
    logits: dict[str, list[torch.Tensor]] = {}
    done: dict[str, list[int]] = {}
    record_logits(engine, lambda seqs, lg: [logits.setdefault(s.request_id, []).append(lg[i].clone())
                                            for i, s in enumerate(seqs)])
    seqs = []
    for i, p in enumerate(prompts):
        seq = engine.new_sequence(f"r{i}", list(p), Sampling(max_new_tokens=max_new_tokens),
                                  emit=lambda t, lp, fin, err, i=i: done.__setitem__(f"r{i}", True) if fin else None)
        seqs.append(seq)
        engine.add(seq)
    while len(done) < len(prompts):
        engine.step()
    return [s.generated for s in seqs], [torch.stack(logits[s.request_id]) for s in seqs]


def run_hf(model_dir: Path, prompts: list[list[int]], max_new_tokens: int):
    """transformers greedy generate, one prompt at a time (no padding effects)."""
    from transformers import AutoConfig

    auto = hf_auto_class(AutoConfig.from_pretrained(str(model_dir)))
    model = auto.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    enc_dec = bool(model.config.is_encoder_decoder)
    toks, logits = [], []
    for p in prompts:
        out = model.generate(torch.tensor([p]), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             do_sample=False, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=0, eos_token_id=None)
        # encoder-decoder: sequences = [decoder_start, generated...]
        toks.append(out.sequences[0, 1 if enc_dec else len(p):].tolist())
        logits.append(torch.stack([s[0].float() for s in out.logits]))
    return toks, logits
