"""`shardserve generate`: the gRPC client."""

from __future__ import annotations

import json
import sys

import grpc

from controller.api.params import RequestError, parameters_from_dict
from shardserve.v1 import generate_pb2 as gpb
from shardserve.v1 import generate_pb2_grpc as gpb_grpc

FINISH_NAMES = {v.number: v.name.removeprefix("FINISH_REASON_").lower()
                for v in gpb.FinishReason.DESCRIPTOR.values}


def parse_params(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"--param {pair!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)  # numbers, booleans, lists
        except json.JSONDecodeError:
            out[key] = value
    return out


def run(args) -> int:
    try:
        params = parse_params(args.param)
        if args.max_new_tokens is not None:
            params["max_new_tokens"] = args.max_new_tokens
        proto_params = parameters_from_dict(params)
    except RequestError as e:
        print(f"error: {e.code.name}: {e.message}", file=sys.stderr)
        return 2
    channel = grpc.insecure_channel(args.address)
    stub = gpb_grpc.GenerationStub(channel)
    try:
        if args.stream:
            for prompt in args.prompts:
                tokens, finish = [], 0
                for msg in stub.GenerateStream(gpb.GenerateStreamRequest(model=args.model, prompt=prompt,
                                                                         parameters=proto_params), timeout=args.timeout):
                    tokens.append(msg.token_id)
                    if args.json:
                        print(json.dumps({"index": msg.index, "token_id": msg.token_id, "text": msg.text,
                                          "finish_reason": FINISH_NAMES[msg.finish_reason] if msg.finish_reason else None}),
                              flush=True)
                    else:
                        sys.stdout.write(msg.text)
                        sys.stdout.flush()
                    finish = msg.finish_reason
                if not args.json:
                    sys.stdout.write("\n")
                    print(f"[{len(tokens)} tokens, finish: {FINISH_NAMES[finish]}]", file=sys.stderr)
        else:
            resp = stub.Generate(gpb.GenerateRequest(model=args.model, prompts=args.prompts, parameters=proto_params),
                                 timeout=args.timeout)
            for out in resp.outputs:
                if args.json:
                    obj = {"text": out.text, "token_ids": list(out.token_ids),
                           "finish_reason": FINISH_NAMES[out.finish_reason], "prompt_tokens": out.prompt_tokens,
                           "generated_tokens": out.generated_tokens}
                    if out.log_probs:
                        obj["log_probs"] = list(out.log_probs)
                    if out.HasField("cum_log_prob"):
                        obj["cum_log_prob"] = out.cum_log_prob
                    print(json.dumps(obj, ensure_ascii=False))
                else:
                    print(out.text)
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    finally:
        channel.close()
    return 0


def register(sub) -> None:
    p = sub.add_parser("generate", help="send prompts to a running server")
    p.add_argument("prompts", nargs="+", metavar="PROMPT")
    p.add_argument("--address", default="127.0.0.1:50051")
    p.add_argument("--model", default="", help="model name (default: the only one served)")
    p.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="any generation parameter (FasterTransformer or Hugging Face name); repeatable")
    p.add_argument("--json", action="store_true", help="one JSON object per output")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    p.set_defaults(func=run)
