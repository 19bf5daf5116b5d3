"""Quality of quantization: train a small Llama on the OS licence texts, then report held-out
perplexity at fp32, bf16, int8, int4 (weight-only) and w8a8 (int8 weights and per-token int8
activations), and top-1 agreement with fp32.

    python bench/quality.py [--steps 600] [--out bench/results/quality.json]

The int8/int4/w8a8 rows swap every attention/MLP nn.Linear for worker.layers.linear.QuantizableLinear
(the code `--quantize` runs in the worker, through native/ops: the extension when built, else
torch); embeddings and the LM head stay fp32, as in the worker. bf16 casts the whole model.
Data: controller/acquire/demo_model.py's corpus and tokenizer; lines shuffled with a fixed seed, 10% held
out. Perplexity = exp(mean next-token NLL) over non-overlapping windows of the held-out stream;
agreement = share of held-out positions whose argmax equals fp32's (teacher forced).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller.acquire.demo_model import build_tokenizer, corpus_lines  # noqa: E402
from native import ops  # noqa: E402
from worker.layers.linear import QuantizableLinear, tensor_bytes  # noqa: E402

SEED = 0
CTX = 128  # tokens per training / evaluation window


class QLinear(QuantizableLinear):
    """An nn.Linear's weights behind the worker's quantized matmul."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.weight = nn.Parameter(lin.weight.detach().clone(), requires_grad=False)
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.bias)


def quantized_copy(model: nn.Module, method: str) -> nn.Module:
    import copy

    q = copy.deepcopy(model)
    for layer in q.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    ql = QLinear(child)
                    ql.quantize_(method)
                    setattr(parent, name, ql)
    return q


def token_stream(tok, lines: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for enc in tok(lines, add_special_tokens=False)["input_ids"]:
        ids.extend(enc + [tok.eos_token_id])
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor) -> torch.Tensor:  # [N, CTX + 1], non-overlapping
    n = (len(stream) - 1) // CTX
    return torch.stack([stream[i * CTX:i * CTX + CTX + 1] for i in range(n)])


def train(model, data: torch.Tensor, steps: int, batch: int, lr: float, max_seconds: float) -> list[float]:
    """AdamW, warm-up then cosine over `steps`; stops early (fewer steps, logged) past max_seconds."""
    g = torch.Generator().manual_seed(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    losses = []
    t0 = time.monotonic()
    for step in range(steps):
        if time.monotonic() - t0 > max_seconds:
            print(f"  time budget {max_seconds:.0f} s reached after {step} of {steps} steps", flush=True)
            break
        starts = torch.randint(0, len(data) - CTX - 1, (batch,), generator=g)
        x = torch.stack([data[s:s + CTX + 1] for s in starts])
        out = model(input_ids=x[:, :-1])
        loss = nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == steps - 1:
            print(f"  step {step:4d} loss {loss.item():.3f} ({time.monotonic() - t0:.0f} s)", flush=True)
    model.eval()
    return losses


@torch.no_grad()
def evaluate(model, wins: torch.Tensor, dtype=torch.float32) -> tuple[float, torch.Tensor]:
    """(perplexity, argmax per position [N, CTX])."""
    nll, count, preds = 0.0, 0, []
    for chunk in wins.split(16):
        logits = model(input_ids=chunk[:, :-1]).logits.float()
        nll += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                                                 reduction="sum"))
        count += chunk[:, 1:].numel()
        preds.append(logits.argmax(-1))
    return math.exp(nll / count), torch.cat(preds)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-train-seconds", type=float, default=300.0, help="training stops early past this")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "quality.json")
    args = p.parse_args(argv)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as d:
        tok = build_tokenizer(Path(d))
    lines = corpus_lines()
    random.Random(SEED).shuffle(lines)
    n_eval = len(lines) // 10
    train_ids, eval_ids = token_stream(tok, lines[n_eval:]), token_stream(tok, lines[:n_eval])
    eval_wins = windows(eval_ids)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=CTX,
                         tie_word_embeddings=False, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tokenizer and data ready in {time.monotonic() - t0:.0f} s")
    print(f"{len(lines)} lines ({n_eval} held out), {len(train_ids)} train / {len(eval_ids)} held-out tokens, "
          f"{n_params / 1e6:.2f} M parameters, kernels: {ops.kernel_path('cpu')} ({ops.backend('cpu').detail})")
    losses = train(model, train_ids, args.steps, args.batch, args.lr, args.max_train_seconds)
    t_train = time.monotonic() - t0

    rows = []
    ref_ppl, ref_pred = evaluate(model, eval_wins)
    variants = [("fp32", model), ("bf16", None), ("int8", None), ("int4", None), ("w8a8", None)]
    for name, m in variants:
        if name == "bf16":
            import copy

            m = copy.deepcopy(model).to(torch.bfloat16)
        elif name in ("int8", "int4", "w8a8"):
            m = quantized_copy(model, name)
        ppl, pred = (ref_ppl, ref_pred) if name == "fp32" else evaluate(m, eval_wins)
        rows.append({"weights": name, "held_out_ppl": round(ppl, 3),
                     "top1_agreement_with_fp32": round(float((pred == ref_pred).float().mean()), 4),
                     "weight_bytes": tensor_bytes(m)})
    result = {
        "bench": "quality", "seed": SEED, "steps": len(losses), "steps_planned": args.steps, "batch": args.batch, "ctx": CTX,
        "parameters": n_params, "train_tokens": len(train_ids), "held_out_tokens": int(eval_wins[:, 1:].numel()),
        "final_train_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4), "train_seconds": round(t_train, 1),
        "kernel_path": ops.kernel_path("cpu"), "torch": torch.__version__, "rows": rows,
    }
    print("\n| weights | held-out ppl | top-1 agreement with fp32 | model bytes |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['weights']} | {r['held_out_ppl']:.3f} | {r['top1_agreement_with_fp32']:.4f} | "
              f"{r['weight_bytes'] / 1e6:.2f} MB |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out} ({time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
