"""A test hook a worker imports when its WorkerConfig names it (`test_hooks`): every Status call raises,
as a worker with a broken servicer would (gRPC answers UNKNOWN); the controller must fail the start at
once instead of retrying until its start timeout."""

from worker.service import WorkerService


def failing_status(self, request, context):
    raise RuntimeError("injected Status failure (tests/integration/status_error_hook.py)")


WorkerService.Status = failing_status
