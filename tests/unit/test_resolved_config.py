"""A partition carries its model's transformers config resolved (worker/model_config.py) so
that a worker loading it never imports transformers: the resolved values must read exactly as the
config object does, for every family, and the activations by name must be transformers' bit for bit."""

import pytest
import torch

from tests.parity.test_families import _configs
from worker.model_config import UNRESOLVED, ResolvedConfig, read_resolved_config, resolved_config_values
from worker.models.common import ACTIVATIONS
from worker.models.registry import max_positions, model_class

MISSING = object()


class Recorder:
    """A config that records every attribute name read from it."""

    def __init__(self, cfg):
        object.__setattr__(self, "_cfg", cfg)
        object.__setattr__(self, "names", set())

    def __getattr__(self, name):
        self.names.add(name)
        return getattr(self._cfg, name)


def _all_configs():
    import transformers as tf

    cfgs = _configs()
    cfgs["t5"] = tf.T5Config(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                             feed_forward_proj="gated-gelu", architectures=["T5ForConditionalGeneration"])
    return cfgs


SCALED = {"llama-linear-rope", "llama3-rope"}


@pytest.mark.parametrize("family", sorted(_all_configs()))
def test_resolved_config_reads_as_the_config_object(family):
    cfg = _all_configs()[family]
    values = resolved_config_values(cfg)
    if family in SCALED:  # transformers computes scaled frequencies from the object: the worker loads it
        assert values is None
        return
    resolved = ResolvedConfig(**values)
    rec = Recorder(cfg)
    with torch.device("meta"):
        model_class(cfg)(rec)
    max_positions(rec)
    names = (rec.names | set(cfg.to_dict()) | set(getattr(cfg, "attribute_map", {}))) - set(UNRESOLVED)
    assert not rec.names & set(UNRESOLVED)
    differ = {n: (getattr(cfg, n, MISSING), getattr(resolved, n, MISSING)) for n in sorted(names)
              if getattr(cfg, n, MISSING) != getattr(resolved, n, MISSING)}
    assert not differ
    assert getattr(resolved, "no_such_attribute", "default") == "default"


def test_another_transformers_version_is_not_read():
    values = resolved_config_values(_all_configs()["gpt2"])
    assert read_resolved_config({"resolved_config": values}) is not None
    assert read_resolved_config({"resolved_config": {**values, "transformers_version": "0.0.1"}}) is None
    assert read_resolved_config({}) is None


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activations_are_transformers_bit_for_bit(name, dtype):
    from transformers.activations import ACT2FN

    x = (torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 4).to(dtype)
    assert torch.equal(ACTIVATIONS[name](x), ACT2FN[name](x))


def test_the_controllers_file_reaches_the_worker(tmp_path):
    """write_resolved_file (controller) -> wait_resolved_file (worker): the values, or None where the
    controller could not resolve them (the worker then resolves them itself), or None after the wait."""
    import json

    from transformers import GPT2Config

    from worker.model_config import wait_resolved_file, write_resolved_file

    src = tmp_path / "model"
    GPT2Config(n_embd=64, n_layer=2, n_head=4, architectures=["GPT2LMHeadModel"]).save_pretrained(src)
    write_resolved_file(src, tmp_path / "ok.json")
    got = wait_resolved_file(tmp_path / "ok.json", timeout_s=5)
    assert got.hidden_size == 64 and got.n_layer == 2 and got.architectures == ["GPT2LMHeadModel"]
    write_resolved_file(tmp_path / "nowhere", tmp_path / "bad.json")
    assert "error" in json.loads((tmp_path / "bad.json").read_text())
    assert wait_resolved_file(tmp_path / "bad.json", timeout_s=5) is None
    assert wait_resolved_file(tmp_path / "never.json", timeout_s=0.05) is None
