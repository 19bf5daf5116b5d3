"""The worker answers only its controller: every call carries the per-launch token (WorkerConfig
.auth_token) as metadata; a call without it, or with another, is UNAUTHENTICATED."""

from __future__ import annotations

import hmac

import grpc

from worker.config import TOKEN_METADATA


def _refuse(request, context):
    context.abort(grpc.StatusCode.UNAUTHENTICATED, "this worker answers only the controller that started it")


class TokenCheck(grpc.ServerInterceptor):
    def __init__(self, token: str):
        self.token = token.encode()
        self.refusal = grpc.unary_unary_rpc_method_handler(_refuse)
        self.stream_refusal = grpc.unary_stream_rpc_method_handler(_refuse)

    def intercept_service(self, continuation, details):
        got = dict(details.invocation_metadata or ()).get(TOKEN_METADATA, "")
        if hmac.compare_digest(got.encode() if isinstance(got, str) else got, self.token):
            return continuation(details)
        handler = continuation(details)
        if handler is not None and handler.response_streaming:
            return self.stream_refusal
        return self.refusal
