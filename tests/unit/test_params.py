"""Parameter names, types, ranges and FasterTransformer defaults (controller/api/params.py)."""

import grpc
import pytest

from controller.api.params import RequestError, parameters_from_dict, resolve

KW = dict(prompt_tokens=10, max_model_len=100, vocab_size=50, eos_token_ids=(2,), encode_plain=lambda s: [3, 4])


def resolved(**params):
    return resolve(parameters_from_dict(params), **KW)


def test_ft_defaults_and_beam_names():
    r = resolved()
    assert (r.seed, r.num_beams, r.length_penalty, r.top_k, r.temperature) == (0, 1, 0.0, 1, 0.0)
    r = resolved(beam_width=4, len_penalty=1.0, beam_search_diversity_rate=0.5, top_k=50)
    assert r.num_beams == 4 and r.length_penalty == 1.0 and r.beam_search_diversity_rate == 0.5
    assert r.temperature == 0.0, "beam search does not sample"
    r = resolved(num_beams=2, length_penalty=0.7, seed=9, do_sample=True)
    assert r.num_beams == 2 and r.length_penalty == pytest.approx(0.7) and r.seed == 9


def test_stop_and_bad_words_as_strings_or_token_ids():
    r = resolved(stop_words_list=[[5, 6], [7]], bad_words_list=["no"], stop=[8, 9])
    assert [list(s.token_ids) for s in r.stop_token_sequences] == [[5, 6], [7], [8, 9]]
    assert [list(s.token_ids) for s in r.bad_word_token_sequences] == [[3, 4]]
    r = resolved(bad_words_list=[[11]], is_return_cum_log_probs=True, min_length=3, max_seq_len=7)
    assert [list(s.token_ids) for s in r.bad_word_token_sequences] == [[11]]
    assert r.return_log_probs and r.min_new_tokens == 3 and r.max_new_tokens == 7


@pytest.mark.parametrize("params, needle", [
    ({"num_beams": 17}, "num_beams: 17 is out of range [1, 16]"),
    ({"beam_width": 0}, "num_beams"),
    ({"len_penalty": 11.0}, "length_penalty"),
    ({"beam_search_diversity_rate": -1}, "beam_search_diversity_rate"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_k": 2 ** 40}, "top_k"),
    ({"top_k": 51}, "top_k: 51 is out of range [0, 50]"),
    ({"seed": -1}, "seed"),
    ({"repetition_penalty": 1.0, "presence_penalty": 0.1}, "exclusive"),
    ({"max_new_tokens": 1.5}, "max_new_tokens: expected a non-negative integer"),
    ({"do_sample": "maybe"}, "do_sample: expected a boolean"),
    ({"stop_words_list": [[1], "x"]}, "stop_words_list"),
    ({"bad_words_list": [[99]]}, "vocab_size 50"),
])
def test_invalid_values_name_the_parameter(params, needle):
    with pytest.raises(RequestError) as e:
        resolved(**params)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and needle in e.value.message


def test_beams_refused_for_encoder_decoder_models():
    with pytest.raises(RequestError, match="encoder-decoder") as e:
        resolve(parameters_from_dict({"num_beams": 2}), encoder_decoder=True, **KW)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_beam_request_larger_than_the_kv_cache_is_refused_naming_num_beams():
    from controller.api.params import beam_blocks

    # 10-token prompt, 16-token blocks: no full prompt block to share; 4 beams x ceil(26/16) = 8 blocks
    assert beam_blocks(4, 10, 16, 16) == 8
    assert beam_blocks(4, 40, 16, 16) == 2 + 4 * (4 - 2)  # two shared prompt blocks
    ok = resolve(parameters_from_dict({"num_beams": 4, "max_new_tokens": 16}), kv_cache=(8, 16), **KW)
    assert ok.num_beams == 4
    with pytest.raises(RequestError) as e:
        resolve(parameters_from_dict({"num_beams": 4, "max_new_tokens": 16}), kv_cache=(7, 16), **KW)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "num_beams: 4 beams" in e.value.message and "holds 7" in e.value.message
    resolve(parameters_from_dict({"num_beams": 16, "max_new_tokens": 80}), **KW)  # cache not known yet
