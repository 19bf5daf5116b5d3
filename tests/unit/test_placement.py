"""Placement maths, layout checks before launch, stage splits, the step-plan wire format."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from controller.fleet.placement import LayoutError, check_config, check_layout, free_port, place
from controller.fleet.replica import Replica, ReplicaSpec
from worker.distributed import ParallelState, parallel_state, stage_layer_counts
from worker.engine.pipeline import STEP, decode_plan, encode_plan, prune_for_stage
from worker.engine.runner import StepPlan


def llama_config(**kw):
    from transformers import LlamaConfig

    base = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
                architectures=["LlamaForCausalLM"])
    return LlamaConfig(**{**base, **kw})


# ---- devices, cores, ports ---------------------------------------------------------------------

def test_cpu_cores_are_divided_into_disjoint_sets():
    p = place(2, 2, "cpu", cpus=list(range(8)), port=1234)
    assert p.world_size == 4 and p.master_port == 1234
    assert [(r.rank, r.tp_rank, r.pp_rank) for r in p.ranks] == [(0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1)]
    assert [r.cpus for r in p.ranks] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert all(r.threads == 2 and r.device == "cpu" for r in p.ranks)


def test_more_ranks_than_cores_run_one_thread_each_unpinned():
    p = place(2, 2, "cpu", cpus=[0, 1])
    assert all(r.threads == 1 and r.cpus == () for r in p.ranks)


def test_threads_flag_caps_the_share_and_one_rank_is_not_pinned():
    assert [r.threads for r in place(2, 1, "cpu", threads=3, cpus=list(range(16))).ranks] == [3, 3]
    one = place(1, 1, "cpu", cpus=list(range(16))).ranks[0]
    assert one.threads == 16 and one.cpus == ()


def test_gpu_ranks_get_one_device_each_and_too_few_devices_is_an_error():
    assert [r.device for r in place(2, 2, "cuda", gpu_count=4).ranks] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert place(1, 1, "cuda:3", gpu_count=8).ranks[0].device == "cuda:3"
    with pytest.raises(LayoutError, match="needs 4 GPUs, 2 visible"):
        place(2, 2, "cuda", gpu_count=2)


def test_free_port_is_bindable_on_loopback():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


# ---- layout checks -------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, tp, pp, needles", [
    (dict(num_attention_heads=4, num_key_value_heads=4), 3, 1, ["attention heads=4", "tensor_parallel_degree=3", "1, 2, 4"]),
    (dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3), 2, 1, ["key/value heads=3", "tensor_parallel_degree=2"]),
    (dict(intermediate_size=130), 4, 1, ["intermediate size=130"]),
    (dict(num_hidden_layers=2), 1, 3, ["layers=2", "pipeline_parallel_degree=3"]),
    (dict(vocab_size=3, num_attention_heads=4, num_key_value_heads=4), 4, 1, ["vocabulary=3"]),
])
def test_layouts_that_cannot_split_name_the_numbers(kw, tp, pp, needles):
    with pytest.raises(LayoutError) as err:
        check_config(llama_config(**kw), tp, pp)
    for n in needles:
        assert n in str(err.value)


def test_layouts_that_split_pass_including_uneven_vocabulary_and_replicated_kv_heads():
    check_config(llama_config(vocab_size=101), 4, 1)  # vocabulary rows split unevenly (padded)
    check_config(llama_config(num_key_value_heads=1), 4, 2)  # one KV head, replicated on 4 ranks
    check_config(llama_config(), 2, 4)


def test_stage_layer_override_must_cover_the_model():
    check_config(llama_config(), 1, 2, (3, 1))
    with pytest.raises(LayoutError, match=r"stage layers \[2, 1\]"):
        check_config(llama_config(), 1, 2, (2, 1))


def test_bad_layout_fails_before_any_process_starts(tmp_path):
    llama_config(num_attention_heads=4, num_key_value_heads=4).save_pretrained(tmp_path)
    replica = Replica("bad", ReplicaSpec(model_dir=tmp_path, tensor_parallel=3), tmp_path)
    with pytest.raises(LayoutError, match="attention heads=4"):
        replica.start()
    assert replica.procs == []


def test_check_layout_builds_each_rank_on_meta(tmp_path):
    """The worker's own layers judge the split (here: a fine one, so nothing raises)."""
    llama_config().save_pretrained(tmp_path)
    assert json.loads((Path(tmp_path) / "config.json").read_text())["num_attention_heads"] == 4
    check_layout(tmp_path, 2, 2)


# ---- pipeline stages -----------------------------------------------------------------------------

def test_balanced_and_explicit_stage_splits():
    assert stage_layer_counts(5, 2) == [3, 2]
    assert stage_layer_counts(4, 4) == [1, 1, 1, 1]
    ranges = [ParallelState(pp_rank=s, pp_size=3).layer_range(7) for s in range(3)]
    assert ranges == [(0, 3), (3, 5), (5, 7)]
    assert ParallelState(pp_rank=1, pp_size=2, stage_layers=(3, 1)).layer_range(4) == (3, 4)
    with pytest.raises(ValueError, match="summing"):
        ParallelState(pp_rank=0, pp_size=2, stage_layers=(1, 1)).layer_range(4)
    with pytest.raises(ValueError, match="pipeline_parallel=3"):
        stage_layer_counts(2, 3)


def _stage_model(pp_rank: int, tied: bool):
    from worker.models.llama import LlamaForCausalLM

    with parallel_state(ParallelState(pp_rank=pp_rank, pp_size=2)), torch.device("meta"):
        model = LlamaForCausalLM(llama_config(tie_word_embeddings=tied))
        dropped = prune_for_stage(model)
    kinds = {n for n, m in model.named_modules() if type(m).__name__ == "StageMissing"}
    return model, dropped, kinds


def test_each_stage_holds_only_its_layers_embedding_and_head():
    model, dropped, missing = _stage_model(0, tied=False)
    assert dropped == ["lm_head"] and missing == {"lm_head", "model.layers.2", "model.layers.3"}
    model, dropped, missing = _stage_model(1, tied=False)
    assert dropped == ["model.embed_tokens"] and missing == {"model.embed_tokens", "model.layers.0", "model.layers.1"}


def test_a_tied_head_keeps_its_embedding_on_the_last_stage():
    model, dropped, _ = _stage_model(1, tied=True)
    assert dropped == [] and model.lm_head.weight is model.model.embed_tokens.weight


# ---- the step plan on the wire --------------------------------------------------------------------

def test_step_plan_round_trips_through_flat_int64_tensors():
    plan = StepPlan(torch.tensor([5, 6, 7, 8]), torch.tensor([0, 1, 2, 9]), torch.tensor([16, 17, 18, 41]),
                    torch.tensor([[1, 0], [2, 3]]), torch.tensor([3, 1]), torch.tensor([3, 10]), torch.tensor([2, 3]))
    header, body = encode_plan(plan)
    assert header.dtype == body.dtype == torch.long and header.dim() == body.dim() == 1
    assert int(header[0]) == STEP and int(header[1]) == len(plan.__dataclass_fields__)
    back = decode_plan(header, body)
    for f in plan.__dataclass_fields__:
        assert torch.equal(getattr(back, f), getattr(plan, f)), f
    empty = StepPlan(*(torch.tensor([9]) for _ in range(3)), torch.tensor([[4]]), torch.tensor([1]),
                     torch.tensor([20]), torch.zeros(0, dtype=torch.long))
    assert decode_plan(*encode_plan(empty)).sample_index.numel() == 0
