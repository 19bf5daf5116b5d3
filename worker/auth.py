"""The worker answers only its controller: every call carries the per-launch token (WorkerConfig
.auth_token) as metadata; a call without it, or with another, is UNAUTHENTICATED. A leader serving TCP
(the Ray executor) does so over TLS when its config names a certificate and key (server_credentials)."""

from __future__ import annotations

import hmac
import socket
from pathlib import Path

import grpc

from worker.config import TOKEN_METADATA


def _refuse(request, context):
    context.abort(grpc.StatusCode.UNAUTHENTICATED, "this worker answers only the controller that started it")


class TokenCheck(grpc.ServerInterceptor):
    def __init__(self, token: str):
        self.token = token.encode()
        self.refusal = grpc.unary_unary_rpc_method_handler(_refuse)
        self.stream_refusal = grpc.unary_stream_rpc_method_handler(_refuse)
        self.bidi_refusal = grpc.stream_stream_rpc_method_handler(_refuse)

    def intercept_service(self, continuation, details):
        got = dict(details.invocation_metadata or ()).get(TOKEN_METADATA, "")
        if hmac.compare_digest(got.encode() if isinstance(got, str) else got, self.token):
            return continuation(details)
        handler = continuation(details)
        if handler is not None and handler.request_streaming and handler.response_streaming:
            return self.bidi_refusal
        if handler is not None and handler.response_streaming:
            return self.stream_refusal
        return self.refusal


def server_credentials(tls_cert: str, tls_key: str) -> grpc.ServerCredentials | None:
    """TLS credentials from the PEM files at these paths on this node; None when both are "".
    Raises ValueError naming the file, the node and the reason when one cannot be read or is not PEM."""
    if not tls_cert and not tls_key:
        return None
    pems = []
    for name, path in (("tls_cert", tls_cert), ("tls_key", tls_key)):
        try:
            pem = Path(path).read_bytes()
        except OSError as e:
            raise ValueError(f"WorkerConfig.{name} {path}: cannot read it on this node ({socket.gethostname()}): "
                             f"{e.strerror}; the file must be at that path on every node that may host a "
                             "leader") from None
        if b"-----BEGIN " not in pem:
            raise ValueError(f"WorkerConfig.{name} {path}: not a PEM file")
        pems.append(pem)
    cert, key = pems
    return grpc.ssl_server_credentials([(key, cert)])
