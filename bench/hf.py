"""transformers.generate on the same weights and token ids: one request at a time, and static
batches of 8 (left-padded). Requests arrive at t=0; a static system returns each request's tokens
when its batch ends, so TTFT = latency, and later batches wait for earlier ones."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from bench.workload import Result, Workload, make_result, median_round


def load(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


@torch.inference_mode()
def _generate(model, batch: list[list[int]], new_tokens: int) -> int:
    width = max(len(p) for p in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, p in enumerate(batch):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=0, eos_token_id=None)
    return (out.shape[1] - width) * len(batch)


def run(model, model_name: str, work: Workload, rounds, batch_size: int, limit: int | None = None) -> Result:
    """`rounds`: prompt sets, one timed pass each (bench.workload.round_prompts); the median round."""
    _generate(model, [rounds[0][0][1]], 2)  # warm-up
    results = []
    for prompts in rounds:
        ids = [p[1] for p in prompts][: limit or len(prompts)]
        lat, generated = [], 0
        t0 = time.perf_counter()
        for i in range(0, len(ids), batch_size):
            generated += _generate(model, ids[i:i + batch_size], work.new_tokens)
            lat.extend([time.perf_counter() - t0] * len(ids[i:i + batch_size]))
        wall = time.perf_counter() - t0
        scenario = "one at a time" if batch_size == 1 else f"static batches of {batch_size}"
        if len(ids) < len(prompts):
            scenario += f" ({len(ids)} req)"
        results.append(make_result("transformers", model_name, scenario, wall, generated, lat, lat))
    return median_round(results)
