"""The controller's end of Worker.Session: every request routed to one replica launch over one
bidirectional call, demultiplexed here into one SessionCall per request.

A SessionCall looks to its reader like the per-request `Worker.Generate` call it replaces: iterate
it for WorkerGenerateResponse messages, `cancel()` it from any thread, and failures raise a
grpc.RpcError with `code()` and `details()`:
  * CANCELLED after `cancel()`; DEADLINE_EXCEEDED when its timeout passes (the worker is told to
    free the slot in both cases);
  * INVALID_ARGUMENT when the worker refused the request (the message names the field);
  * UNAVAILABLE when the session call ended under it (the worker died, the channel closed): every
    request still on it fails so, and the next request opens a new call.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import grpc

from shardserve.v1 import worker_pb2 as wpb

log = logging.getLogger(__name__)


class CallError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


CODES = {c.value[0]: c for c in grpc.StatusCode}


class SessionCall:
    """One request on a session; its messages arrive on `q` from the session's reader thread."""

    def __init__(self, stream: _Stream, request_id: str, timeout: float | None):
        self.stream, self.request_id = stream, request_id
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.q: queue.SimpleQueue = queue.SimpleQueue()  # WorkerGenerateResponse | CallError
        self.done = False  # the iterator ended (the reading thread)

    def __iter__(self):
        return self

    def __next__(self) -> wpb.WorkerGenerateResponse:
        if self.done:
            raise StopIteration
        try:
            if self.deadline is None:
                item = self.q.get()
            else:
                item = self.q.get(timeout=max(0.0, self.deadline - time.monotonic()))
        except queue.Empty:
            self.cancel()
            item = self.q.get()  # the CANCELLED just queued, or what the worker sent before it
            if isinstance(item, CallError):
                item = CallError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        if isinstance(item, CallError):
            self.done = True
            raise item
        if item.finish_reason != wpb.WORKER_FINISH_NONE:
            self.done = True
        return item

    def deliver(self, item) -> None:
        """From the reader thread: a message, or the CallError that ends the call."""
        self.q.put(item)

    def cancel(self) -> None:
        """Any thread; a no-op once the call has finished."""
        if self.stream.forget(self.request_id):
            self.q.put(CallError(grpc.StatusCode.CANCELLED, "Locally cancelled"))


class _Stream:
    """One Worker.Session call and the requests on it."""

    def __init__(self, stub, metadata: tuple, name: str):
        self.name = name
        self.up: queue.SimpleQueue = queue.SimpleQueue()  # WorkerSessionRequest; None ends the upstream
        self.lock = threading.Lock()
        self.calls: dict[str, SessionCall] = {}
        self.ended = False
        self.call = stub.Session(self._requests(), metadata=metadata)
        threading.Thread(target=self._read, daemon=True, name=f"session-{name}").start()

    def _requests(self):
        while (msg := self.up.get()) is not None:
            yield msg

    def start(self, request: wpb.WorkerGenerateRequest, timeout: float | None) -> SessionCall | None:
        call = SessionCall(self, request.request_id, timeout)
        with self.lock:
            if self.ended:
                return None
            self.calls[request.request_id] = call
        self.up.put(wpb.WorkerSessionRequest(generate=request))
        return call

    def forget(self, request_id: str) -> bool:
        """Drop a call that has not finished and tell the worker to free its slot; False if finished."""
        with self.lock:
            call = self.calls.pop(request_id, None)
            if call is None or self.ended:
                return call is not None
        self.up.put(wpb.WorkerSessionRequest(cancel_request_id=request_id))
        return True

    def _read(self) -> None:
        why = "the worker ended the session"
        try:
            for step in self.call:
                for ev in step.events:
                    if ev.status_code:
                        with self.lock:
                            call = self.calls.pop(ev.request_id, None)
                        if call is not None:
                            call.deliver(CallError(CODES.get(ev.status_code, grpc.StatusCode.UNKNOWN),
                                                   ev.status_message))
                        continue
                    final = ev.response.finish_reason != wpb.WORKER_FINISH_NONE
                    with self.lock:
                        call = self.calls.pop(ev.request_id, None) if final else self.calls.get(ev.request_id)
                    if call is not None:
                        call.deliver(ev.response)
        except grpc.RpcError as e:
            why = f"{e.code().name}: {e.details()}"
        except Exception as e:  # noqa: BLE001 - whatever broke the reader, no request may hang on it
            log.exception("replica %s: session reader failed", self.name)
            why = f"session reader failed: {e}"
        with self.lock:
            self.ended = True
            calls, self.calls = list(self.calls.values()), {}
        self.up.put(None)
        for call in calls:
            call.deliver(CallError(grpc.StatusCode.UNAVAILABLE, f"worker session ended ({why})"))
        if calls:
            log.warning("replica %s: worker session ended with %d requests on it (%s)", self.name, len(calls), why)

    def close(self) -> None:
        self.call.cancel()


class WorkerSession:
    """The session of one replica launch; opens a new call when the last one has ended."""

    def __init__(self, stub, metadata: tuple, name: str):
        self.stub, self.metadata, self.name = stub, metadata, name
        self.lock = threading.Lock()
        self.stream: _Stream | None = None

    def generate(self, request: wpb.WorkerGenerateRequest, timeout: float | None) -> SessionCall:
        with self.lock:
            for _ in range(2):  # the current call may end between the check and the start
                if self.stream is None or self.stream.ended:
                    self.stream = _Stream(self.stub, self.metadata, self.name)
                call = self.stream.start(request, timeout)
                if call is not None:
                    return call
        raise CallError(grpc.StatusCode.UNAVAILABLE, f"replica {self.name}: cannot open a worker session")

    def close(self) -> None:
        with self.lock:
            if self.stream is not None:
                self.stream.close()
