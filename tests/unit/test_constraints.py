"""Structured output in the sampler (worker/engine/constraints.py) on a tiny byte-level BPE trained
in-process: the bitmask unpacks to exactly llguidance's allowed set, constrained rows sample only
allowed tokens, rows without a grammar are untouched (batch invariance), matchers advance and end."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("llguidance")

from controller.api.constraints import ConstraintError, grammar_for  # noqa: E402
from worker.engine import constraints  # noqa: E402
from worker.engine.sampler import Sampler, sample  # noqa: E402
from worker.engine.sequence import Sampling, Sequence  # noqa: E402

TEXT = ["the quick brown fox jumps over the lazy dog 0123456789", '{"name": "x", "n": [1, 2, 3]}',
        "yes no maybe abc abd abe"] * 20


@pytest.fixture(scope="module")
def tokenizer():
    import llguidance.hf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"],
                                                      show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
    return hf, llguidance.hf.from_tokenizer(hf, n_vocab=len(hf))


def test_the_worker_compiles_each_distinct_grammar_once(tokenizer, tmp_path):
    hf, _ = tokenizer
    hf.save_pretrained(str(tmp_path))
    grammars = constraints.Grammars(tmp_path, len(hf) + 5)  # logits wider than the tokenizer (padded vocab)
    g = grammar_for("choice", ["abc", "abd"])
    a, b = grammars.matcher(g), grammars.matcher(g)
    assert grammars.compiled == 1 and a is not b
    assert a.consume_tokens(grammars.tokenizer().tokenize_str("ab")) and not a.is_stopped() and not b.is_stopped()
    grammars.matcher(grammar_for("regex", "[a-c]+"))
    assert grammars.compiled == 2
    with pytest.raises(ValueError, match="tokens"):
        constraints.Grammars(tmp_path, len(hf) - 1).matcher(g)  # a tokenizer larger than the logits


def matcher(tokenizer, kind, value):
    from llguidance import LLMatcher

    m = LLMatcher(tokenizer[1], grammar_for(kind, value), log_level=0)
    assert not m.is_error(), m.get_error()
    return m


def test_apply_bitmask_masks_exactly_the_cleared_bits():
    g = torch.Generator(device="cpu").manual_seed(0)
    V = 77  # not a multiple of 32: the last word's high bits are past the vocabulary
    logits = torch.randn(5, V, generator=g, device="cpu")
    bitmask = torch.randint(-(1 << 31), (1 << 31) - 1, (2, 3), generator=g, dtype=torch.int32, device="cpu")
    rows = torch.tensor([1, 3], device="cpu")
    out = constraints.apply_bitmask(logits, rows, bitmask)
    for r in range(5):
        for t in range(V):
            if r in (1, 3):
                bit = (int(bitmask[[1, 3].index(r), t // 32]) >> (t % 32)) & 1
                assert (out[r, t] == logits[r, t]) if bit else (out[r, t] == float("-inf"))
            else:
                assert out[r, t] == logits[r, t]


def test_constrained_rows_sample_only_allowed_tokens_and_the_others_keep_theirs(tokenizer):
    hf, _ = tokenizer
    V = len(hf)
    g = torch.Generator(device="cpu").manual_seed(1)
    logits = torch.randn(4, V, generator=g, device="cpu")
    seqs = [Sequence(f"r{i}", [1, 2], Sampling(max_new_tokens=8)) for i in range(4)]
    alone = sample(logits, seqs)
    seqs[1].matcher = matcher(tokenizer, "regex", "ab[cde]")
    seqs[3].matcher = matcher(tokenizer, "choice", ["yes", "no"])
    sampler = Sampler()
    active, first = list(range(4)), None
    for _ in range(8):  # each constrained row to its end; the others take one token
        toks, _ = sampler(logits[active], [seqs[i] for i in active])
        first = first or dict(zip(active, toks))
        for i, t in zip(active, toks):
            seqs[i].token_ids.append(t)
        active = [i for i in active if seqs[i].matcher is not None and not constraints.done(seqs[i])]
        if not active:
            break
    assert first[0] == alone[0][0] and first[2] == alone[0][2]  # rows without a grammar: the same tokens
    assert hf.decode(seqs[1].generated) in ("abc", "abd", "abe") and hf.decode(seqs[3].generated) in ("yes", "no")


def test_controller_validation_names_the_field():
    for kind, value in [("json_schema", '{"type": 3}'), ("regex", "(a"), ("grammar", "start: x"), ("choice", [])]:
        with pytest.raises(ConstraintError) as e:
            grammar_for(kind, value)
        assert e.value.field == kind and str(e.value).startswith(f"parameter {kind}: ")


def test_parameters_carry_one_resolved_grammar_to_the_worker():
    from controller.api.params import RequestError, parameters_from_dict, resolve

    kw = dict(prompt_tokens=3, max_model_len=64, vocab_size=300, eos_token_ids=(1,), encode_plain=lambda s: [])
    out = resolve(parameters_from_dict({"guided_json": {"type": "object", "properties": {"a": {"type": "integer"}}}}),
                  **kw)
    assert out.grammar == grammar_for("json_schema", '{"type": "object", "properties": {"a": {"type": "integer"}}}')
    assert resolve(parameters_from_dict({"json_object": False}), **kw).grammar == ""
    assert resolve(parameters_from_dict({"max_new_tokens": 4}), **kw).grammar == ""
    for params, field in [({"choice": ["a"], "num_beams": 2}, "choice"), ({"regex": 3}, "regex"),
                          ({"json_schema": 5}, "json_schema"), ({"guided_choice": "ab"}, "guided_choice")]:
        with pytest.raises(RequestError) as e:
            resolve(parameters_from_dict(params), **kw)
        assert e.value.message.startswith(f"parameter {field}"), e.value.message


def test_an_encoder_decoder_engine_runs_constrained_and_plain_requests_together(tokenizer, tmp_path):
    """T5 (tiny, random weights) with the tiny tokenizer in its folder: the decoder's output obeys
    the grammar and ends with STOP; the unconstrained request beside it keeps its greedy tokens."""
    from transformers import T5Config

    from tests.oracle import make_random_model
    from worker.engine.build import build_engine
    from worker.engine.engine import EngineConfig
    from worker.engine.sequence import Finish

    hf, _ = tokenizer
    config = T5Config(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                      architectures=["T5ForConditionalGeneration"])
    model_dir = make_random_model(config, tmp_path / "t5", std=0.4)
    hf.save_pretrained(str(model_dir))
    engine = build_engine(EngineConfig(model_dir=model_dir, max_model_len=64, num_kv_blocks=64))

    def run(constrained: bool) -> dict:
        out: dict[str, list] = {}
        for name, grammar in [("plain", ""), ("json", grammar_for("json_schema", json.dumps(
                {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
                 "required": ["n"], "additionalProperties": False})))][:1 + constrained]:
            seq = engine.new_sequence(name, [5, 9, 200, 17, 1], Sampling(max_new_tokens=24),
                                      emit=lambda t, lp, fin, err, name=name: out.setdefault(name, []).append((t, fin)))
            if grammar:
                seq.matcher = engine.grammars.matcher(grammar)
            engine.add(seq)
        while sum(1 for v in out.values() if v[-1][1] is not None) < 1 + constrained:
            engine.step()
        return {k: ([t for ts, _ in v for t in ts], v[-1][1]) for k, v in out.items()}

    alone = run(False)
    both = run(True)
    assert both["plain"] == alone["plain"]
    tokens, finish = both["json"]
    assert finish is Finish.STOP and json.loads(hf.decode(tokens))["n"] in range(100)
