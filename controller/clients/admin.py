"""`shardserve admin`: the admin API client. Human tables by default, `--json` for scripts.

    shardserve admin --address A --token T list
    shardserve admin load NAME SRC [--tp N --pp M --dtype D --quantize Q --device D --replicas R --no-wait]
    shardserve admin unload NAME [--grace S]
    shardserve admin describe NAME
    shardserve admin scale NAME N [--no-wait --grace S]
    shardserve admin drain [MODEL] [--resume --grace S]

The token comes from --token or $SHARDSERVE_ADMIN_TOKEN. --tls-ca PEM (or --tls for the system's roots)
talks TLS to a server started with --tls-cert/--tls-key. Exit status: 0 done, 1 the server refused or
failed (the status and its message go to stderr), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import grpc
from google.protobuf.json_format import MessageToDict

from controller.api.auth import TOKEN_ENV, bearer
from shardserve.v1 import admin_pb2 as apb
from shardserve.v1 import admin_pb2_grpc as apb_grpc


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def table(rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _layout(lay: apb.Layout) -> str:
    q = f" {lay.quantize}" if lay.quantize else ""
    return f"tp{lay.tensor_parallel} pp{lay.pipeline_parallel} {lay.dtype}{q} {lay.device}"


def show_list(resp: apb.ListModelsResponse) -> str:
    rows = [["NAME", "STATE", "READY", "IN FLIGHT", "LAYOUT", "ARCHITECTURE", "SOURCE"]]
    for m in resp.models:
        rows.append([m.name, m.state, f"{m.ready_replicas}/{m.replicas}", m.in_flight, _layout(m.layout),
                     m.architecture or "-", m.source])
    out = table(rows) if resp.models else "no models loaded"
    return out + ("" if resp.accepting else "\n(server drained: admitting no new requests)")


def show_detail(d: apb.ModelDetail) -> str:
    lines = [
        f"model:        {d.name}",
        f"state:        {d.state}" + (f" ({d.phase})" if d.phase not in ("", d.state, "serving") else ""),
        f"source:       {d.source or '(server default)'}",
        f"path:         {d.path or '-'}",
        f"layout:       {_layout(d.layout)}",
        f"architecture: {d.architecture or '-'}" + (f", vocab {d.vocab_size}, context {d.max_context_length} tokens"
                                                     if d.architecture else ""),
        f"replicas:     {sum(r.state == 'ready' for r in d.replicas)} ready of {d.target_replicas} wanted; "
        f"{d.in_flight} requests in flight; load began {d.seconds_since_load:.1f}s ago",
    ]
    if d.error:
        lines.append(f"error:        {d.error}")
    if d.replicas:
        rows = [["REPLICA", "STATE", "PID", "OUTSTANDING", "RESTARTS", "KERNELS", "SINCE LAUNCH"]]
        for r in d.replicas:
            rows.append([r.name, r.state, r.pid or "-", r.outstanding, r.restarts, r.kernel_path or "-",
                         f"{r.seconds_since_launch:.1f}s"])
        lines += ["", table(rows)]
        ranks = [["REPLICA", "RANK", "NODE", "DEVICE", "PARAMETERS", "KV CACHE"]]
        for r in d.replicas:
            ranks += [[r.name, k.rank, k.node or "-", k.device, _size(k.parameter_bytes), _size(k.kv_cache_bytes)] for k in r.ranks]
        if len(ranks) > 1:
            lines += ["", table(ranks)]
        for r in d.replicas:
            if r.load_phases:
                phases = ", ".join(f"{p.phase} {p.seconds:.2f}s" for p in r.load_phases)
                lines.append(f"load phases {r.name}: {phases}")
            if r.progress:
                lines.append(f"progress {r.name}: {r.progress}")
            if r.error:
                lines.append(f"error {r.name}: {r.error.splitlines()[0] if r.error else ''}")
    return "\n".join(lines)


def _channel(args) -> grpc.Channel:
    if args.tls_ca or args.tls:
        roots = open(args.tls_ca, "rb").read() if args.tls_ca else None
        return grpc.secure_channel(args.address, grpc.ssl_channel_credentials(root_certificates=roots))
    return grpc.insecure_channel(args.address)


def call(args, stub: apb_grpc.AdminStub):
    md = bearer(args.token) if args.token else ()
    kw = {"metadata": md, "timeout": args.timeout}
    c = args.admin_command
    if c == "list":
        return stub.ListModels(apb.ListModelsRequest(), **kw)
    if c == "describe":
        return stub.DescribeModel(apb.DescribeModelRequest(name=args.name), **kw)
    if c == "load":
        layout = apb.Layout(tensor_parallel=args.tp, pipeline_parallel=args.pp, dtype=args.dtype or "",
                            quantize=args.quantize or "", device=args.device or "")
        return stub.LoadModel(apb.LoadModelRequest(name=args.name, source=args.source, layout=layout,
                                                   replicas=args.replicas, wait=not args.no_wait), **kw)
    if c == "unload":
        return stub.UnloadModel(apb.UnloadModelRequest(name=args.name, grace_seconds=args.grace or 0), **kw)
    if c == "scale":
        return stub.ScaleModel(apb.ScaleModelRequest(name=args.name, replicas=args.replicas, wait=not args.no_wait,
                                                     grace_seconds=args.grace or 0), **kw)
    if c == "drain":
        return stub.Drain(apb.DrainRequest(model=args.model or "", timeout_seconds=args.grace or 0,
                                           resume=args.resume), **kw)
    raise AssertionError(c)


def human(args, resp) -> str:
    if isinstance(resp, apb.ListModelsResponse):
        return show_list(resp)
    if isinstance(resp, apb.ModelDetail):
        return show_detail(resp)
    if isinstance(resp, apb.UnloadModelResponse):
        cut = f", {resp.cut_in_flight} cut at the end of the grace period" if resp.cut_in_flight else ""
        return (f"unloaded {resp.name} in {resp.seconds:.1f}s ({resp.finished_in_flight} in-flight requests "
                f"finished{cut})")
    if isinstance(resp, apb.DrainResponse):
        what = args.model or "server"
        if args.resume:
            return f"{what}: admitting requests again"
        state = "drained" if resp.drained else f"still {resp.in_flight} requests in flight"
        return f"{what}: admitting no new requests; {state} after {resp.seconds:.1f}s"
    return str(resp)


def run(args) -> int:
    if not args.token:
        args.token = os.environ.get(TOKEN_ENV, "")
    channel = _channel(args)
    try:
        resp = call(args, apb_grpc.AdminStub(channel))
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        channel.close()
    if args.json:
        print(json.dumps(MessageToDict(resp, preserving_proto_field_name=True,
                                       always_print_fields_with_no_presence=True), indent=2))
    else:
        print(human(args, resp))
    if isinstance(resp, apb.ModelDetail) and resp.state == "failed":
        return 1
    return 0


def _common(defaults: bool) -> argparse.ArgumentParser:
    """Connection and output flags, accepted before or after the subcommand."""
    d = (lambda v: v) if defaults else (lambda v: argparse.SUPPRESS)
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--address", default=d("127.0.0.1:50051"), help="the server's gRPC address")
    p.add_argument("--token", default=d(""), help=f"the admin token (default: ${TOKEN_ENV})")
    p.add_argument("--tls-ca", default=d(None), metavar="PEM", help="talk TLS, trusting this CA certificate")
    p.add_argument("--tls", action="store_true", default=d(False), help="talk TLS with the system's CA roots")
    p.add_argument("--json", action="store_true", default=d(False), help="print the response as JSON")
    p.add_argument("--timeout", type=float, default=d(None), help="deadline of the call, seconds")
    return p


def register(sub) -> None:
    p = sub.add_parser("admin", help="manage a running server: list, load, unload, describe, scale, drain",
                       parents=[_common(True)])
    cmds = p.add_subparsers(dest="admin_command", required=True, metavar="ACTION")
    common = _common(False)
    cmds.add_parser("list", parents=[common], help="models, their state and replicas")
    c = cmds.add_parser("describe", parents=[common], help="layout, ranks, devices, memory, state, load phases")
    c.add_argument("name")
    c = cmds.add_parser("load", parents=[common], help="load a model under a new name")
    c.add_argument("name")
    c.add_argument("source", help="a local folder, s3://bucket/prefix/, a Hugging Face cache folder or cached hub id, "
                   "or a serving.properties naming one")
    c.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    c.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree")
    c.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"])
    c.add_argument("--quantize", default=None, choices=["int8", "int4", "w8a8"])
    c.add_argument("--device", default=None, help="cpu or cuda (default: the server's)")
    c.add_argument("--replicas", type=int, default=1)
    c.add_argument("--no-wait", action="store_true", help="return at once; `describe` shows progress")
    c = cmds.add_parser("unload", parents=[common], help="drain a model, then stop its workers")
    c.add_argument("name")
    c.add_argument("--grace", type=float, default=None, help="seconds in-flight requests get (default: the server's)")
    c = cmds.add_parser("scale", parents=[common], help="set a model's replica count")
    c.add_argument("name")
    c.add_argument("replicas", type=int)
    c.add_argument("--no-wait", action="store_true", help="return at once; `describe` shows progress")
    c.add_argument("--grace", type=float, default=None, help="seconds in-flight requests get on removed replicas")
    c = cmds.add_parser("drain", parents=[common], help="stop admitting requests (server or one model)")
    c.add_argument("model", nargs="?", default="", help="one model (default: the whole server)")
    c.add_argument("--resume", action="store_true", help="admit requests again")
    c.add_argument("--grace", type=float, default=None, help="seconds to wait for in-flight requests")
    p.set_defaults(func=run)
