"""Helpers shared by the parity tests: run our engine in-process and transformers on the same
weights, greedy, and return tokens and per-step logits of both."""

from __future__ import annotations

from pathlib import Path

import torch

from worker.engine.build import build_engine
from worker.engine.engine import EngineConfig
from worker.engine.sequence import Sampling, Sequence


def make_random_model(config, out: Path, seed: int = 0, std: float = 0.08, model_cls=None) -> Path:
    """Save a random model built from a transformers config class, weights drawn wide enough
    that greedy outputs do not collapse into one repeated token."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = (model_cls or AutoModelForCausalLM).from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, std)
            elif "norm" in name or "ln" in name:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, std)
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def run_ours(model_dir: Path, prompts: list[list[int]], max_new_tokens: int, **engine_kw):
    """All prompts batched together in one engine; returns (tokens, logits) per prompt,
    logits as [steps, vocab] fp32."""
    engine = build_engine(EngineConfig(model_dir=Path(model_dir), **engine_kw))
    logits: dict[str, list[torch.Tensor]] = {}
    done: dict[str, list[int]] = {}
    engine.logits_hook = lambda seqs, lg: [logits.setdefault(s.request_id, []).append(lg[i].clone())
                                           for i, s in enumerate(seqs)]
    seqs = []
    for i, p in enumerate(prompts):
        seq = Sequence(f"r{i}", list(p), Sampling(max_new_tokens=max_new_tokens),
                       emit=lambda t, lp, fin, err, i=i: done.__setitem__(f"r{i}", True) if fin else None)
        seqs.append(seq)
        engine.add(seq)
    while len(done) < len(prompts):
        engine.step()
    return [s.generated for s in seqs], [torch.stack(logits[s.request_id]) for s in seqs]


def run_hf(model_dir: Path, prompts: list[list[int]], max_new_tokens: int):
    """transformers greedy generate, one prompt at a time (no padding effects)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    model.eval()
    toks, logits = [], []
    for p in prompts:
        out = model.generate(torch.tensor([p]), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             do_sample=False, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=0, eos_token_id=None)
        toks.append(out.sequences[0, len(p):].tolist())
        logits.append(torch.stack([s[0].float() for s in out.logits]))
    return toks, logits
