"""The embedded default model: a small random Llama with a byte-level BPE tokenizer trained on
text that ships with the OS. Built deterministically and offline; its text is not meaningful.

The weights are made with torch and transformers' LlamaForCausalLM, so `demo_model_path` (what the
controller calls) builds them in a child process (`python -m controller.acquire.demo_model DIR`):
the controller process itself never imports torch.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

DEMO_VERSION = "demo-llama-v1"
VOCAB_SIZE = 4096
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]


def corpus_files() -> list[Path]:
    """Plain-text files present on every Debian-based machine (licence texts), sorted."""
    roots = [Path("/usr/share/common-licenses")]
    files = sorted(p for r in roots if r.is_dir() for p in r.iterdir() if p.is_file() and not p.is_symlink())
    if not files:  # not Debian: Python's own licence text ships with every CPython
        files = sorted(Path(sys.prefix).glob("lib/python3*/LICENSE.txt")) + sorted(
            Path(sys.base_prefix).glob("lib/python3*/LICENSE.txt"))
    if not files:
        raise FileNotFoundError("no OS text found to train the demo tokenizer on")
    return files


def corpus_lines() -> list[str]:
    lines = []
    for f in corpus_files():
        lines.extend(line.rstrip("\n") for line in f.read_text(errors="replace").splitlines() if line.strip())
    return lines


def build_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus_lines(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=1024)
    fast.save_pretrained(str(out))
    return fast


def build_demo_model(out: Path, seed: int = 0) -> Path:
    """Write a Hugging Face folder (config.json, model.safetensors, tokenizer files) to `out`, in this
    process (it imports torch: the controller calls `demo_model_path`, which runs it in a child)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
        rms_norm_eps=1e-5, torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # wider than the training init so greedy text does not collapse into repeats
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    model.save_pretrained(str(out), safe_serialization=True)
    (out / "DEMO_MODEL").write_text(f"{DEMO_VERSION}: random weights, not meaningful text\n")
    return out


def demo_model_path(cache_dir: Path) -> Path:
    """The demo model in the cache, built once (atomically) if absent."""
    target = Path(cache_dir) / DEMO_VERSION
    if (target / "DEMO_MODEL").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("building the demo model into %s (once)", target)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    try:
        r = subprocess.run([sys.executable, "-m", "controller.acquire.demo_model", str(tmp)],
                           capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"building the demo model failed (exit {r.returncode}):\n{r.stderr[-4000:]}")
        try:
            tmp.rename(target)
        except OSError:  # built concurrently by another process: keep theirs
            if not (target / "DEMO_MODEL").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def register(sub) -> None:
    p = sub.add_parser("demo-model", help="build the embedded demo model into DIR")
    p.add_argument("dir", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=lambda a: print(build_demo_model(a.dir, a.seed)) or 0)


if __name__ == "__main__":  # the child process of demo_model_path
    import argparse

    cli = argparse.ArgumentParser(prog="python -m controller.acquire.demo_model")
    cli.add_argument("dir", type=Path)
    cli.add_argument("--seed", type=int, default=0)
    a = cli.parse_args()
    print(build_demo_model(a.dir, a.seed))
