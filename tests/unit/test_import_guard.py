"""The control plane never imports torch: importing the CLI (every subcommand's module) leaves it out."""

import subprocess
import sys

from tests.integration.server import ROOT

CHECK = """
import sys
import controller.cli, controller.server
controller.cli.build_parser()
heavy = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "worker.models", "worker.layers",
                                                                       "worker.engine", "native")))
print(heavy)
"""


def test_importing_the_controller_cli_leaves_torch_and_model_code_out():
    r = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
