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
