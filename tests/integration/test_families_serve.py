"""Two families through the real server (controller + worker processes, real gRPC): GPT-2
(decoder-only) and T5 (encoder-decoder: prompts feed the encoder, the decoder starts from
decoder_start_token_id). Greedy tokens must equal transformers' `generate` on the same ids."""

from __future__ import annotations

import functools

import grpc
import pytest
import torch

from shardserve.v1 import generate_pb2 as gpb
from shardserve.v1 import generate_pb2_grpc as gpb_grpc
from tests.integration.server import ServerProcess
from tests.oracle import make_random_model

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "translate English to German: the house is wonderful",
    "summarize: shardserve serves large language models over gRPC",
    "a tensor parallel worker holds one shard of every weight",
] * 4
PROMPTS = ["translate English to German: the fox", "summarize: the worker holds one shard"]
NEW_TOKENS = 12


def build_tokenizer(out, specials: list[str], append_eos: bool):
    """A tiny byte-level BPE tokenizer saved as a transformers fast tokenizer. T5-style
    (append_eos): '</s>' ends every prompt; GPT-style: '<s>' starts it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if append_eos:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        kw = dict(pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    else:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        kw = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, **kw)
    fast.save_pretrained(str(out))
    return fast


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import GPT2Config, T5Config

    root = tmp_path_factory.mktemp("serve-families")
    gpt2_dir, t5_dir = root / "gpt2", root / "t5"
    gtok = build_tokenizer(gpt2_dir, ["<unk>", "<s>", "</s>"], append_eos=False)
    make_random_model(GPT2Config(vocab_size=len(gtok), n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                 bos_token_id=1, eos_token_id=2, architectures=["GPT2LMHeadModel"]),
                      gpt2_dir, std=0.25)
    ttok = build_tokenizer(t5_dir, ["<pad>", "</s>", "<unk>"], append_eos=True)
    make_random_model(T5Config(vocab_size=len(ttok), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                               feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0,
                               eos_token_id=1, architectures=["T5ForConditionalGeneration"]),
                      t5_dir, std=0.4)
    return {"gpt2": (gpt2_dir, gtok), "t5": (t5_dir, ttok)}


@functools.lru_cache(maxsize=2)
def hf_model(model_dir):
    from transformers import AutoConfig

    from tests.oracle import hf_auto_class

    cfg = AutoConfig.from_pretrained(str(model_dir))
    return hf_auto_class(cfg).from_pretrained(str(model_dir), dtype=torch.float32).eval()


def hf_greedy(model_dir, tok, prompt: str, n: int) -> list[int]:
    model = hf_model(model_dir)
    cfg = model.config
    ids = torch.tensor([tok(prompt)["input_ids"]])
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=cfg.eos_token_id)
    return out[0, 1 if cfg.is_encoder_decoder else ids.shape[1]:].tolist()


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_served_family_matches_transformers(family, models, tmp_path):
    model_dir, tok = models[family]
    with ServerProcess("--model", str(model_dir), "--name", family, "--threads", "1", "--max-model-len", "64",
                       cache_dir=tmp_path) as server:
        stub = gpb_grpc.GenerationStub(server.channel)
        params = gpb.GenerationParameters(max_new_tokens=NEW_TOKENS)
        unary = stub.Generate(gpb.GenerateRequest(prompts=PROMPTS, parameters=params, model=family))
        for prompt, out in zip(PROMPTS, unary.outputs):
            assert list(out.token_ids) == hf_greedy(model_dir, tok, prompt, NEW_TOKENS), prompt
            assert out.prompt_tokens == len(tok(prompt)["input_ids"])
        streamed = list(stub.GenerateStream(gpb.GenerateStreamRequest(prompt=PROMPTS[0], parameters=params,
                                                                      model=family)))
        assert [m.token_id for m in streamed] == list(unary.outputs[0].token_ids)
        info = stub.ModelInfo(gpb.ModelInfoRequest()).models[0]
        assert info.encoder_decoder == (family == "t5") and info.max_context_length == 64
        if family == "t5":
            # each side has its own limit: a 40-token prompt and 40 new tokens together exceed 64,
            # fine for an encoder-decoder; a prompt or an output over 64 is refused, naming the side
            long_prompt = " ".join(["the fox"] * 14)
            assert 30 < len(tok(long_prompt)["input_ids"]) <= 64
            ok = stub.Generate(gpb.GenerateRequest(prompts=[long_prompt], model=family,
                                                   parameters=gpb.GenerationParameters(max_new_tokens=40)))
            assert 0 < ok.outputs[0].generated_tokens <= 40
            for prompt, n, needle in ((" ".join(["the fox"] * 40), 4, "encoder"), (PROMPTS[0], 64, "decoder")):
                with pytest.raises(grpc.RpcError) as err:
                    stub.Generate(gpb.GenerateRequest(prompts=[prompt], model=family,
                                                      parameters=gpb.GenerationParameters(max_new_tokens=n)))
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details()
