"""A truncated safetensors file is refused before any rank starts: `serve` exits 1 with the file
named and the reason on one line (no worker traceback)."""

import shutil
import subprocess
import sys

from controller.acquire.demo_model import build_demo_model
from tests.integration.server import ROOT


def test_serve_refuses_a_truncated_checkpoint_naming_the_file(tmp_path):
    model = build_demo_model(tmp_path / "model")
    (model / "DEMO_MODEL").unlink()
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    proc = subprocess.run([sys.executable, "-m", "controller.cli", "serve", "--model", str(model), "--port", "0",
                           "--http-port", "0", "--cache-dir", str(tmp_path / "cache")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    line = next(ln for ln in out.splitlines() if "corrupt weights file" in ln)
    assert str(weights) in line and "truncated" in line, out
    assert "exited with code" not in out and "Traceback" not in out, out
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
