"""The admin gRPC servicer: token check, then a thin layer over `lifecycle.ModelManager`.

Auth: every call carries `authorization: Bearer <token>` metadata, compared with the server's token in
constant time (hmac.compare_digest). No token configured -> every call is refused (PERMISSION_DENIED,
saying how to enable the API); missing or wrong token -> UNAUTHENTICATED.
"""

from __future__ import annotations

import functools
import hmac
import logging
import time

import grpc

from controller.api.auth import TOKEN_ENV
from controller.api.params import RequestError
from controller.fleet.lifecycle import ModelManager, ModelRecord
from controller.fleet.placement import Layout
from shardserve.v1 import admin_pb2 as apb
from shardserve.v1 import admin_pb2_grpc as apb_grpc

log = logging.getLogger(__name__)

DTYPES = {"": None, "fp32": "fp32", "float32": "fp32", "fp16": "fp16", "float16": "fp16", "bf16": "bf16",
          "bfloat16": "bf16"}
QUANTIZE = {"": None, "none": None, "int8": "int8", "int4": "int4", "w8a8": "w8a8"}


def _admin_call(method):
    """Check the token, map RequestError to its status; the method body never sees an unauthorized call."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        self._check_token(context)
        try:
            return method(self, request, context)
        except RequestError as e:
            context.abort(e.code, e.message)

    return wrapper


def layout_from_proto(msg: apb.Layout, default_device: str) -> Layout:
    dtype = msg.dtype.strip().lower()
    quantize = msg.quantize.strip().lower()
    if dtype not in DTYPES:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"field layout.dtype: {msg.dtype!r} is not one of fp32, fp16, bf16")
    if quantize not in QUANTIZE:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"field layout.quantize: {msg.quantize!r} is not one of int8, int4, w8a8")
    device = msg.device.strip().lower() or default_device
    if device != "cpu" and not device.startswith("cuda"):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"field layout.device: {msg.device!r} is not cpu or cuda")
    return Layout(tensor_parallel=msg.tensor_parallel or 1, pipeline_parallel=msg.pipeline_parallel or 1,
                  dtype=DTYPES[dtype], quantize=QUANTIZE[quantize], device=device)


def layout_to_proto(layout: Layout) -> apb.Layout:
    return apb.Layout(tensor_parallel=layout.tensor_parallel, pipeline_parallel=layout.pipeline_parallel,
                      dtype=layout.resolved_dtype, quantize=layout.quantize or "", device=layout.device)


def _status_of(rec: ModelRecord):
    return next((r.status for r in rec.replicas if r.status is not None), None)


def summary(rec: ModelRecord) -> apb.ModelSummary:
    st = _status_of(rec)
    return apb.ModelSummary(name=rec.name, state=rec.state, ready_replicas=sum(r.ready for r in rec.replicas),
                            replicas=len(rec.replicas), source=rec.source or str(rec.path or ""),
                            layout=layout_to_proto(rec.layout), in_flight=rec.in_flight,
                            architecture=st.architecture if st else "")


def detail(rec: ModelRecord) -> apb.ModelDetail:
    st = _status_of(rec)
    now = time.monotonic()
    out = apb.ModelDetail(
        name=rec.name, state=rec.state, phase=rec.phase if rec.mode == "serving" else rec.mode, error=rec.error,
        source=rec.source, path=str(rec.path or ""), layout=layout_to_proto(rec.layout),
        architecture=st.architecture if st else "", vocab_size=st.vocab_size if st else 0,
        max_context_length=st.max_model_len if st else 0, in_flight=rec.in_flight, target_replicas=rec.target,
        seconds_since_load=now - rec.created)
    for r in rec.replicas:
        alive = r.proc is not None and r.proc.poll() is None
        d = out.replicas.add(name=r.name, state=r.state, pid=r.proc.pid if alive else 0, outstanding=r.outstanding,
                             restarts=r.restarts, error=r.failure,
                             seconds_since_launch=now - rec.launched_at.get(r.name, now))
        if r.state in ("starting", "restarting") and r.stderr_tail:
            d.progress = r.stderr_tail[-1][-300:]
        if r.status is not None:
            d.kernel_path = r.status.kernel_path
            procs = list(r.procs)
            for k in r.status.ranks:
                where = procs[k.rank] if k.rank < len(procs) else None
                d.ranks.add(rank=k.rank, device=k.device, parameter_bytes=k.parameter_bytes,
                            kv_cache_bytes=k.kv_cache_bytes, node=getattr(where, "node", ""),
                            node_id=getattr(where, "node_id", ""))
            if rec.download_seconds:  # the controller's phase, before the worker's own
                d.load_phases.add(phase="download", seconds=rec.download_seconds)
            if rec.partition_seconds:
                d.load_phases.add(phase="partition", seconds=rec.partition_seconds)
            for p in r.status.load_phases:
                d.load_phases.add(phase=p.phase, seconds=p.seconds)
    return out


class AdminService(apb_grpc.AdminServicer):
    def __init__(self, manager: ModelManager, token: str | None, default_device: str = "cpu"):
        self.manager = manager
        self._token = token.encode() if token else None
        self.default_device = default_device

    def _check_token(self, context) -> None:
        if self._token is None:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          "the admin API is disabled: this server was started without an admin token; "
                          f"restart it with --admin-token or the {TOKEN_ENV} environment variable")
        given = ""
        for key, value in context.invocation_metadata():
            if key == "authorization":
                given = value
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._token):
            log.warning("admin call %s refused: %s token", context.peer(), "wrong" if given else "no")
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "admin token missing or wrong: send metadata 'authorization: Bearer <token>' "
                          "(shardserve admin --token T)" if not given else "admin token is wrong")

    def _wait(self, rec: ModelRecord, context) -> None:
        remaining = context.time_remaining()
        finished = self.manager.wait_settled(rec, remaining if remaining is not None and remaining < 1e6 else None,
                                             context.is_active)
        if finished and rec.state == "failed":
            raise RequestError(rec.error_code, f"model {rec.name!r} failed to load: {rec.error}")

    @_admin_call
    def LoadModel(self, request: apb.LoadModelRequest, context):
        if not request.source.strip():
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               "field source: required (a model folder, s3://bucket/prefix/, a hub id, ...)")
        layout = layout_from_proto(request.layout, self.default_device)
        rec = self.manager.load(request.name, request.source.strip(), layout, request.replicas or 1)
        log.info("admin: load %s from %s (%s, %d replicas)", rec.name, rec.source, layout, rec.target)
        if request.wait:
            self._wait(rec, context)
        return detail(rec)

    @_admin_call
    def UnloadModel(self, request: apb.UnloadModelRequest, context):
        start = time.monotonic()
        began, cut = self.manager.unload(request.name, request.grace_seconds or None)
        return apb.UnloadModelResponse(name=request.name, finished_in_flight=began - cut, cut_in_flight=cut,
                                       seconds=time.monotonic() - start)

    @_admin_call
    def ListModels(self, request, context):
        return apb.ListModelsResponse(models=[summary(r) for r in self.manager.list()],
                                      accepting=self.manager.router.accepting)

    @_admin_call
    def DescribeModel(self, request: apb.DescribeModelRequest, context):
        return detail(self.manager.get(request.name))

    @_admin_call
    def ScaleModel(self, request: apb.ScaleModelRequest, context):
        rec = self.manager.scale(request.name, request.replicas, request.grace_seconds or None)
        log.info("admin: scale %s to %d replicas", rec.name, request.replicas)
        if request.wait:
            self._wait(rec, context)
        return detail(rec)

    @_admin_call
    def Drain(self, request: apb.DrainRequest, context):
        start = time.monotonic()
        left, drained = self.manager.drain(request.model, request.timeout_seconds or None, request.resume)
        log.info("admin: %s %s", "resume" if request.resume else "drain", request.model or "the server")
        return apb.DrainResponse(accepting=self.manager.router.accepting, in_flight=left, drained=drained,
                                 seconds=time.monotonic() - start)
