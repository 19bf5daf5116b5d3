"""Sampling functions, parameter resolution and the incremental detokenizer."""

import grpc
import pytest
import torch

from controller.api.params import RequestError, parameters_from_dict, resolve
from controller.tokenizer import IncrementalDetokenizer, StopStrings
from worker.engine.sampler import filter_top_k_top_p, sample
from worker.engine.sequence import Sampling, Sequence


def mkseq(tokens=(1, 2, 3), **kw):
    s = Sequence("r", list(tokens), Sampling(**kw))
    if not s.sampling.greedy:
        s.generator = torch.Generator().manual_seed(s.sampling.seed)
    return s


def test_greedy_picks_argmax_and_reports_its_log_prob():
    logits = torch.tensor([[0.0, 3.0, 1.0, -1.0]])
    toks, lps = sample(logits, [mkseq()])
    assert toks == [1]
    assert lps[0] == pytest.approx(torch.log_softmax(logits[0], -1)[1].item())


def test_top_k_and_top_p_filter():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert torch.isinf(filter_top_k_top_p(logits.clone(), 2, 1.0)[2:]).all()
    probs = torch.softmax(logits, -1)  # [0.64, 0.24, 0.09, 0.03]
    kept = ~torch.isinf(filter_top_k_top_p(logits.clone(), 0, 0.7))
    assert kept.tolist() == [True, True, False, False] and probs[0] < 0.7


def test_seeded_sampling_is_reproducible_and_row_independent():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    a = [sample(logits[i:i + 1], [mkseq(temperature=1.0, seed=5)])[0][0] for i in range(3)]
    b = sample(logits, [mkseq(temperature=1.0, seed=5) for _ in range(3)])[0]
    assert a == b


def test_penalties_min_tokens_and_bad_words():
    logits = torch.zeros(1, 6)
    logits[0, 5] = 10.0  # eos
    s = mkseq(tokens=(1, 2), min_new_tokens=2, eos_token_ids=(5,), bad_word_token_sequences=((2, 4), (3,)))
    s.num_prompt = 2
    toks, _ = sample(logits.clone(), [s])
    assert toks[0] not in (5, 4, 3)
    rep = mkseq(tokens=(0,), repetition_penalty=2.0)
    lg = torch.tensor([[2.0, 1.9]])
    assert sample(lg, [rep])[0] == [1]


def test_params_aliases_types_and_ranges():
    p = parameters_from_dict({"max_seq_len": 5, "random_seed": 3, "temperature": "0.5", "stop_words_list": ["\n"]})
    assert p.max_new_tokens == 5 and p.seed == 3 and p.temperature == 0.5 and list(p.stop) == ["\n"]
    with pytest.raises(RequestError, match="unknown parameter 'nope'"):
        parameters_from_dict({"nope": 1})
    with pytest.raises(RequestError, match="top_k: expected a non-negative integer"):
        parameters_from_dict({"top_k": "many"})
    kw = dict(prompt_tokens=10, max_model_len=100, vocab_size=50, eos_token_ids=(2,), encode_plain=lambda s: [3])
    r = resolve(parameters_from_dict({}), **kw)
    assert r.max_new_tokens == 90 and r.temperature == 0.0 and r.top_k == 1 and list(r.eos_token_ids) == [2]
    r = resolve(parameters_from_dict({"do_sample": True, "top_p": 0.9, "seed": 1}), **kw)
    assert r.temperature == 1.0 and r.top_k == 0 and r.top_p == pytest.approx(0.9) and r.seed == 1
    for bad, needle in [({"max_new_tokens": 91}, "context of 100"), ({"top_p": 2}, "top_p"),
                        ({"repetition_penalty": 1.2, "presence_penalty": 0.5}, "exclusive"),
                        ({"min_new_tokens": 9, "max_new_tokens": 5}, "min_new_tokens")]:
        with pytest.raises(RequestError, match=needle) as e:
            resolve(parameters_from_dict(bad), **kw)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


class ByteCodec:
    """A codec over raw UTF-8 bytes (one token per byte), like a byte-level BPE at its worst."""

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def test_incremental_detokenizer_multibyte_and_spaces():
    text = " héllo wörld — ✓ done"
    ids = list(text.encode())
    detok = IncrementalDetokenizer(ByteCodec(), list(b"prompt"))
    pieces = [detok.push([t]) for t in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_strings_hold_back_prefixes():
    st = StopStrings(["END"])
    out = [st.feed(p) for p in ["abc E", "N", "x", " more EN", "D tail"]]
    assert "".join(out) == "abc ENx more " and st.matched
