"""Every decoder-only family against transformers on the same tiny random weights: three prompts
of different lengths batched together, 32 greedy tokens each, identical tokens, close logits.

Logits tolerance: fp32 on CPU; our op order differs (packed q/k/v, paged gather, ALiBi relative
to the query instead of absolute) but the maths is the same, so differences stay ~1e-5.
"""

import pytest
import torch

from tests.oracle import make_random_model, run_hf, run_ours

LOGIT_ATOL = 1e-3
NEW_TOKENS = 32
PROMPTS = [[1, 5, 9, 200, 17], [1] + list(range(30, 71)), [1, 88]]
V, H, L = 512, 64, 2  # vocab, hidden, layers: tiny, the suite runs in seconds
STD = 0.25  # weight std: wide enough that greedy outputs do not collapse into a repeated token
STD_BY_FAMILY = {"bloom": 0.4, "opt-postln-proj": 0.4}  # LayerNorms right after the embedding / each block tame activations: draw wider


def _configs():
    import transformers as tf

    return {
        "gpt2": tf.GPT2Config(vocab_size=V, n_embd=H, n_layer=L, n_head=4, n_positions=128, bos_token_id=1,
                              eos_token_id=2, architectures=["GPT2LMHeadModel"]),
        "opt": tf.OPTConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=4, ffn_dim=128,
                            max_position_embeddings=128, word_embed_proj_dim=H, architectures=["OPTForCausalLM"]),
        # OPT-350m style: post-LayerNorm blocks, project_in/out around a narrower embedding
        "opt-postln-proj": tf.OPTConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=4,
                                        ffn_dim=128, max_position_embeddings=128, word_embed_proj_dim=32,
                                        do_layer_norm_before=False, architectures=["OPTForCausalLM"]),
        # 6 heads: not a power of two, so the extra ALiBi slopes are exercised
        "bloom": tf.BloomConfig(vocab_size=V, hidden_size=96, n_layer=L, n_head=6, architectures=["BloomForCausalLM"]),
        "gpt_neox": tf.GPTNeoXConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=128, rotary_pct=0.5,
                                     architectures=["GPTNeoXForCausalLM"]),
        "gpt_neox-sequential": tf.GPTNeoXConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L,
                                                num_attention_heads=4, intermediate_size=128,
                                                max_position_embeddings=128, use_parallel_residual=False,
                                                architectures=["GPTNeoXForCausalLM"]),
        "gptj": tf.GPTJConfig(vocab_size=V, n_embd=H, n_layer=L, n_head=4, rotary_dim=8, n_positions=128,
                              architectures=["GPTJForCausalLM"]),
        "llama-tied": tf.LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=128, num_hidden_layers=L,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                     tie_word_embeddings=True, architectures=["LlamaForCausalLM"]),
        "llama-linear-rope": tf.LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=128, num_hidden_layers=L,
                                            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                                            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
                                            architectures=["LlamaForCausalLM"]),
        "llama-dynamic-rope": tf.LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=128, num_hidden_layers=L,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                             rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                              "rope_theta": 10000.0},
                                             architectures=["LlamaForCausalLM"]),
        "llama3-rope": tf.LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=128, num_hidden_layers=L,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0,
                                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 32},
                                      architectures=["LlamaForCausalLM"]),
        "qwen2": tf.Qwen2Config(vocab_size=V, hidden_size=H, intermediate_size=128, num_hidden_layers=L,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                tie_word_embeddings=False, architectures=["Qwen2ForCausalLM"]),
        # window 16 < the longest prompt (42) + 32 new tokens: exact sliding-window attention
        "mistral-window": tf.MistralConfig(vocab_size=V, hidden_size=H, intermediate_size=128, num_hidden_layers=L,
                                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                           sliding_window=16, architectures=["MistralForCausalLM"]),
    }


FAMILIES = list(_configs())
RESULTS: dict[str, tuple[bool, float]] = {}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: make_random_model(cfg, root / name, std=STD_BY_FAMILY.get(name, STD))
            for name, cfg in _configs().items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_greedy_tokens_and_logits_match_transformers(family, family_dirs):
    torch.manual_seed(0)
    ours, our_logits = run_ours(family_dirs[family], PROMPTS, NEW_TOKENS)
    ref, ref_logits = run_hf(family_dirs[family], PROMPTS, NEW_TOKENS)
    diff = max((a - b).abs().max().item() for a, b in zip(our_logits, ref_logits))
    RESULTS[family] = (ours == ref, diff)
    for i in range(len(PROMPTS)):
        assert ours[i] == ref[i], f"{family} prompt {i}: tokens differ\nours {ours[i]}\nhf   {ref[i]}"
        assert len(set(ref[i])) > 3, f"{family}: degenerate reference output for prompt {i}: widen the weights"
    assert diff < LOGIT_ATOL, f"{family}: max logit difference {diff}"
