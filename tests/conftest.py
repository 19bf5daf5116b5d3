import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def restore_backends():
    """Tests that pin a kernel path (native.ops._force) get every device's choice back afterwards."""
    from native import ops

    saved = dict(ops._backends)
    yield
    ops._backends.clear()
    ops._backends.update(saved)


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """A cache folder holding the embedded demo model, built once per session: servers started with
    `--cache-dir` on it skip the build (each module's own fresh cache would rebuild it, ~30 s)."""
    from controller.acquire.demo_model import demo_model_path

    cache = tmp_path_factory.mktemp("demo-cache")
    demo_model_path(cache)
    return cache
