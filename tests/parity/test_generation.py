"""Generation parameters against `transformers.generate` on the same random Llama weights.

Each case runs several requests with different parameters in ONE continuous batch of our engine
(per-request parameters inside a shared batch) and each request alone through transformers.

Semantics that differ from FasterTransformer and how we map them (see controller/api/params.py):
- beam search follows transformers' `_beam_search` with early_stopping=False (finished score
  = sum of log-probs / generated_len ** length_penalty); FT's len_penalty default is 0.0 where
  HF's length_penalty is 1.0, so the FT request `beam_width=4, len_penalty=1.0` is compared
  with HF `num_beams=4, length_penalty=1.0, early_stopping=False`;
- with beams, processors (repetition penalty, min length, bad words) act on log-softmax scores,
  as in HF; in greedy/sampling they act on logits (FT and HF agree there);
- min_length is FT's count of *new* tokens (HF min_new_tokens, not HF min_length, which counts
  the prompt);
- stop words end generation and the stop tokens are part of the output (HF StoppingCriteria keep
  them too); the controller cuts stop *strings* from the text;
- returned log-probs are log_softmax of the processed logits of the chosen token (HF
  `output_scores` after log_softmax), equal within LOGPROB_ATOL (fp32, different op order).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.oracle import make_random_model
from worker.engine.build import build_engine
from worker.engine.engine import EngineConfig
from worker.engine.sequence import Finish, Sampling, Sequence

LOGPROB_ATOL = 1e-4
NEW = 16
PROMPTS = [[1, 5, 9, 200, 17], [1] + list(range(30, 52)), [1, 88, 3]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    return make_random_model(cfg, tmp_path_factory.mktemp("llama-gen"))


@pytest.fixture(scope="module")
def engine(model_dir):
    # small blocks so that beams share some full prompt blocks and recompute partial ones
    return build_engine(EngineConfig(model_dir=Path(model_dir), block_size=4, max_batch_tokens=64))


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return model.eval()


def ours(engine, jobs: list[tuple[list[int], Sampling]], alone: bool = True):
    """All jobs in one engine batch -> [(tokens, log_probs, finish, cum_log_prob)] in job order."""
    out: dict[int, list] = {}
    seqs = []
    for i, (prompt, sampling) in enumerate(jobs):
        acc = out.setdefault(i, [[], [], None])

        def emit(toks, lps, fin, err, acc=acc):
            assert not err, err
            acc[0].extend(toks)
            acc[1].extend(lps)
            if fin is not None:
                acc[2] = fin

        seq = Sequence(f"g{i}", list(prompt), sampling, emit=emit)
        seqs.append(seq)
        engine.add(seq)
    while any(v[2] is None for v in out.values()):
        engine.step()
    assert not alone or engine.blocks.num_free == engine.blocks.num_blocks, "blocks leaked"
    return [(out[i][0], out[i][1], out[i][2], seqs[i].cum_log_prob) for i in range(len(jobs))]


def hf_generate(hf, prompt, **kw):
    kw.setdefault("do_sample", False)
    kw.setdefault("eos_token_id", None)
    out = hf.generate(torch.tensor([prompt]), pad_token_id=0, output_scores=True, return_dict_in_generate=True,
                      **kw)
    return out.sequences[0, len(prompt):].tolist(), out


def hf_greedy_logprobs(out, tokens):
    return [float(torch.log_softmax(s[0].float(), -1)[t]) for s, t in zip(out.scores, tokens)]


def test_greedy_and_log_probs(engine, hf):
    results = ours(engine, [(p, Sampling(max_new_tokens=NEW, return_log_probs=True)) for p in PROMPTS])
    for prompt, (toks, lps, fin, cum) in zip(PROMPTS, results):
        ref, out = hf_generate(hf, prompt, max_new_tokens=NEW)
        assert toks == ref and fin is Finish.LENGTH
        assert len(set(ref)) > 3, "degenerate reference output: widen the weights"
        ref_lps = hf_greedy_logprobs(out, ref)
        assert max(abs(a - b) for a, b in zip(lps, ref_lps)) < LOGPROB_ATOL
        assert abs(cum - sum(ref_lps)) < LOGPROB_ATOL * NEW


def test_repetition_penalty_min_length_bad_words_stop_words(engine, hf):
    from transformers import StoppingCriteria, StoppingCriteriaList

    p0, p1, p2 = PROMPTS
    greedy = ours(engine, [(p, Sampling(max_new_tokens=NEW)) for p in PROMPTS])
    eos = greedy[1][0][0]  # the first greedy token of prompt 1: without min_length it ends at once
    bad = [(greedy[0][0][2],), tuple(greedy[2][0][3:5])]  # one single token, one two-token sequence
    stop = tuple(greedy[2][0][6:8])
    jobs = [
        (p0, Sampling(max_new_tokens=NEW, repetition_penalty=1.5)),
        (p1, Sampling(max_new_tokens=NEW, min_new_tokens=6, eos_token_ids=(eos,))),
        (p0, Sampling(max_new_tokens=NEW, bad_word_token_sequences=tuple(bad[:1]))),
        (p2, Sampling(max_new_tokens=NEW, bad_word_token_sequences=tuple(bad[1:]))),
        (p2, Sampling(max_new_tokens=NEW, stop_token_sequences=(stop,))),
    ]
    results = ours(engine, jobs)

    class StopOn(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            return torch.tensor([input_ids[0, -len(stop):].tolist() == list(stop)])

    refs = [
        hf_generate(hf, p0, max_new_tokens=NEW, repetition_penalty=1.5)[0],
        hf_generate(hf, p1, max_new_tokens=NEW, min_new_tokens=6, eos_token_id=eos)[0],
        hf_generate(hf, p0, max_new_tokens=NEW, bad_words_ids=[list(bad[0])])[0],
        hf_generate(hf, p2, max_new_tokens=NEW, bad_words_ids=[list(bad[1])])[0],
        hf_generate(hf, p2, max_new_tokens=NEW, stopping_criteria=StoppingCriteriaList([StopOn()]))[0],
    ]
    for i, ((toks, _, _, _), ref) in enumerate(zip(results, refs)):
        assert toks == ref, f"job {i}"
    assert results[0][0] != greedy[0][0], "repetition penalty changed nothing: pick a stronger one"
    assert len(results[1][0]) > 6 or results[1][2] is Finish.EOS
    assert results[4][2] is Finish.STOP and tuple(results[4][0][-2:]) == stop


@pytest.mark.parametrize("beams, length_penalty", [(4, 1.0), (2, 0.0)])
def test_beam_search_matches_transformers(engine, hf, beams, length_penalty):
    greedy = ours(engine, [(p, Sampling(max_new_tokens=NEW)) for p in PROMPTS])
    eos = greedy[0][0][5]  # a token the model likes, so hypotheses finish early and late
    sampling = Sampling(max_new_tokens=NEW, num_beams=beams, length_penalty=length_penalty, eos_token_ids=(eos,),
                        return_log_probs=True)
    # beams side by side with a greedy request in the same batch
    jobs = [(p, sampling) for p in PROMPTS] + [(PROMPTS[0], Sampling(max_new_tokens=NEW))]
    results = ours(engine, jobs)
    assert results[-1][0] == greedy[0][0], "a beam request changed its neighbour's tokens"
    for prompt, (toks, lps, fin, cum) in zip(PROMPTS, results):
        ref, out = hf_generate(hf, prompt, max_new_tokens=NEW, num_beams=beams, length_penalty=length_penalty,
                               early_stopping=False, eos_token_id=eos)
        ref = ref[: len(toks)] if ref[len(toks):] == [0] * (len(ref) - len(toks)) else ref  # HF pads to length
        assert toks == ref
        assert fin is (Finish.EOS if toks[-1] == eos else Finish.LENGTH)
        norm = len(toks) ** length_penalty
        assert abs(cum / norm - float(out.sequences_scores[0])) < LOGPROB_ATOL * len(toks)
        assert abs(sum(lps) - cum) < 1e-4


def test_beam_search_steps_count_as_generated_tokens(engine):
    """shardserve_engine_generated_tokens_total counts one token per beam request per step."""
    before = engine.stats.generated_tokens_total
    (toks, _, _, _), = ours(engine, [(PROMPTS[0], Sampling(max_new_tokens=NEW, num_beams=3))])
    assert len(toks) <= engine.stats.generated_tokens_total - before <= NEW


INVARIANCE_JOBS = [
    Sampling(max_new_tokens=NEW),
    Sampling(max_new_tokens=NEW, temperature=0.8, top_k=40, top_p=0.9, seed=123),
    Sampling(max_new_tokens=NEW, temperature=1.0, seed=7, repetition_penalty=1.3),
    Sampling(max_new_tokens=NEW, temperature=1.2, seed=9, presence_penalty=0.4, frequency_penalty=0.3,
             min_new_tokens=4),
    Sampling(max_new_tokens=10, num_beams=3, length_penalty=1.0),
]


def test_batch_invariance_alone_and_amid_eight_others(engine):
    """The same request with the same seed gives the same tokens alone and amid 8 concurrent others.

    How it is guaranteed: each sampled row is processed on its own (sampler.py: per-row penalties and
    a torch.Generator per request, seeded from its seed and advanced only by its own tokens); beam
    search is per request; the model math has no cross-row reductions. Logits may differ in the last
    bits with the batch shape (matmul blocking); the promise is identical tokens.
    """
    target = PROMPTS[1]
    for job in INVARIANCE_JOBS:
        alone = ours(engine, [(target, job)])[0][0]
        others = [Sequence(f"n{i}", [1] + list(range(100 + 7 * i, 100 + 7 * i + 3 + 4 * i)),
                           Sampling(max_new_tokens=NEW + i, temperature=0.0 if i % 2 else 1.0, seed=i,
                                    num_beams=2 if i == 5 else 1)) for i in range(8)]
        for seq in others:
            engine.add(seq)
        for _ in range(3):  # the others are mid-prefill or decoding when the target arrives
            engine.step()
        amid = ours(engine, [(target, job)], alone=False)[0][0]
        while any(s.finish is None for s in others):
            engine.step()
        assert amid == alone, job
    assert engine.blocks.num_free == engine.blocks.num_blocks
