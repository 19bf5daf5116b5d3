"""CTranslate2 on the same weights (converted once with its TransformersConverter), float32 and
int8 compute, all requests in one `generate_batch` call (CT2 batches them; greedy, eos off)."""

from __future__ import annotations

import time
from pathlib import Path

from bench.workload import Result, Workload, make_result, median_round


def convert(model_dir: Path, cache: Path, quantization: str | None = None) -> Path:
    """The CTranslate2 model of `model_dir` in the cache; `quantization` (e.g. "int8") stores the
    weights quantized (its size on disk), else they keep the checkpoint's dtype."""
    import ctranslate2

    out = Path(cache) / (f"ct2-{model_dir.name}" if quantization is None else f"ct2-{model_dir.name}-{quantization}")
    if not (out / "model.bin").is_file():
        ctranslate2.converters.TransformersConverter(str(model_dir)).convert(str(out), quantization=quantization,
                                                                               force=True)
    return out


def run(ct2_dir: Path, model_dir: Path, model_name: str, work: Workload, rounds, compute_type: str,
        threads: int) -> Result:
    """`rounds`: prompt sets, one timed generate_batch each (bench.workload.round_prompts); the median round."""
    import ctranslate2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    gen = ctranslate2.Generator(str(ct2_dir), device="cpu", compute_type=compute_type, intra_threads=threads)
    kw = dict(max_length=work.new_tokens, min_length=work.new_tokens, include_prompt_in_result=False,
              sampling_topk=1, end_token=[])
    gen.generate_batch([tok.convert_ids_to_tokens(rounds[0][0][1])], max_length=2,
                       include_prompt_in_result=False)  # warm-up
    out = []
    for prompts in rounds:
        tokens = [tok.convert_ids_to_tokens(p[1]) for p in prompts]
        t0 = time.perf_counter()
        results = gen.generate_batch(tokens, max_batch_size=len(tokens), **kw)
        wall = time.perf_counter() - t0
        generated = sum(len(r.sequences_ids[0]) for r in results)
        lat = [wall] * len(tokens)
        out.append(make_result("ctranslate2", model_name, f"generate_batch {compute_type}", wall, generated, lat, lat,
                               note=f"{generated / len(tokens):.0f} tokens/request"))
    return median_round(out)
