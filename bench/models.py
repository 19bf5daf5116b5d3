"""The benchmark's models, built once into the cache: the demo model and a ~300M-parameter Llama
with random weights (the demo tokenizer, vocab 4096). Random weights time the same as trained ones."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path


def demo(cache: Path) -> Path:
    from controller.acquire.demo_model import demo_model_path

    return demo_model_path(cache)


def random_llama(cache: Path, name: str, *, hidden: int, intermediate: int, layers: int, heads: int,
                 kv_heads: int, seed: int, std: float | None = None, **config) -> Path:
    """cache/name: a Llama with the demo tokenizer (vocab 4096) and random weights (torch seed `seed`),
    built once. std None: transformers' own init; else every matrix N(0, std) and every vector 1, built on
    the meta device (no init pass). The same arguments write byte-identical files (a cached name stays
    valid); `config` adds LlamaConfig fields (what it leaves out keeps transformers' default)."""
    target = Path(cache) / name
    if (target / "model.safetensors").is_file():
        return target
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    src = demo(cache)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache))
    try:
        for f in src.iterdir():
            if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
                shutil.copy(f, tmp / f.name)
        cfg = LlamaConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
                          bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, **config)
        torch.manual_seed(seed)
        if std is None:
            model = LlamaForCausalLM(cfg)
        else:
            with torch.device("meta"):
                model = LlamaForCausalLM(cfg)
            model = model.to_empty(device="cpu")
            with torch.no_grad():
                for p in model.parameters():
                    if p.dim() > 1:
                        p.normal_(0.0, std)
                    else:
                        p.fill_(1.0)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


LLAMA_300M = "bench-llama-300m-v1"


def llama_300m(cache: Path) -> Path:
    """hidden 1024, 24 layers, MLP 2816, 16 heads (8 KV), vocab 4096: 306M parameters, fp32 safetensors."""
    return random_llama(cache, LLAMA_300M, hidden=1024, intermediate=2816, layers=24, heads=16, kv_heads=8, seed=0,
                        std=0.03, rms_norm_eps=1e-5)


LLAMA_2L = "bench-llama-2l-v1"


def llama_2l(cache: Path) -> Path:
    """A draft-sized Llama with the demo tokenizer (vocab 4096): hidden 128, 2 layers, MLP 352, 4 heads
    (2 KV), random weights (seed 1); ~1.3M parameters, most of them the embedding and LM head."""
    return random_llama(cache, LLAMA_2L, hidden=128, intermediate=352, layers=2, heads=4, kv_heads=2, seed=1)


FLAN_T5_LIKE = "bench-flan-t5-like-v1"
T5_VOCAB = 32128  # Flan-T5's


BY_NAME = {"llama-300m": llama_300m, "demo": demo}  # the decoder-only models the benches take by --model
DRAFTS = {"demo": demo, "llama-2l": llama_2l}  # draft models with the demo tokenizer (bench/spec.py)


def by_name(name: str, cache: Path) -> Path:
    """The folder of bench model `name` (one of BY_NAME), built into `cache` on first use."""
    return BY_NAME[name](cache)


def t5_tokenizer(out: Path):
    """A T5-style tokenizer built offline: byte-level BPE trained on the OS texts the demo model
    uses, pad/eos/unk = 0/1/2, '</s>' appended to every prompt, padded with <extra_id_N> tokens
    to Flan-T5's vocabulary size so every id the model can emit decodes."""
    import os

    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors, trainers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    from controller.acquire.demo_model import corpus_lines

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tok = Tokenizer(tok_models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus_lines(), trainers.BpeTrainer(
        vocab_size=8000, special_tokens=["<pad>", "</s>", "<unk>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([AddedToken(f"<extra_id_{i}>", special=True) for i in range(T5_VOCAB - tok.get_vocab_size())])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512)
    fast.save_pretrained(str(out))
    return fast


def flan_t5_like(cache: Path) -> Path:
    """Flan-T5-small-like shape, random weights (seed 0): 6 encoder + 6 decoder layers, d_model 512,
    8 heads of 64, gated-gelu feed-forward 1024, untied LM head, vocab 32128; fp32 safetensors."""
    target = Path(cache) / FLAN_T5_LIKE
    if (target / "model.safetensors").is_file():
        return target
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    tmp = Path(tempfile.mkdtemp(prefix=".flant5-", dir=cache))
    try:
        tok = t5_tokenizer(tmp)
        config = T5Config(vocab_size=len(tok), d_model=512, d_kv=64, d_ff=1024, num_layers=6, num_decoder_layers=6,
                          num_heads=8, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                          decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                          architectures=["T5ForConditionalGeneration"])
        torch.manual_seed(0)
        model = T5ForConditionalGeneration(config)
        with torch.no_grad():  # wider than the init so greedy outputs do not collapse into one token
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.05)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
