"""Every tensor worker/engine creates names its device, so CPU tensors cannot meet CUDA logits again
(an AST check: a factory call without `device=` fails)."""

import ast
from pathlib import Path

FACTORIES = {"tensor", "as_tensor", "zeros", "ones", "full", "empty", "arange", "rand", "randn", "randint",
             "linspace", "eye"}
ENGINE = Path(__file__).resolve().parents[2] / "worker" / "engine"


def undeviced_calls(source: str) -> list[int]:
    bad = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                and not any(k.arg == "device" for k in node.keywords)):
            bad.append(node.lineno)
    return bad


def test_the_check_catches_a_factory_without_device():
    assert undeviced_calls("import torch\nx = torch.zeros(3)\ny = torch.ones(2, device=d)\n") == [2]


def test_worker_engine_names_the_device_of_every_tensor_it_creates():
    found = {f"{p.name}:{line}" for p in sorted(ENGINE.glob("*.py")) for line in undeviced_calls(p.read_text())}
    assert not found, f"torch tensor factories without device=: {sorted(found)}"
