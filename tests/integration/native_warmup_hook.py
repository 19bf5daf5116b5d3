"""A test hook a worker imports when its WorkerConfig names it (`test_hooks`): the warm-up fails while
the native kernels are in use, as a broken native build would; the torch path warms up as usual."""

from native import ops
from worker.engine import build

_warm_up = build.warm_up


def failing_native_warm_up(engine) -> None:
    if ops.is_native(engine.config.device):
        raise RuntimeError("injected native kernel failure (tests/integration/native_warmup_hook.py)")
    _warm_up(engine)


build.warm_up = failing_native_warm_up
