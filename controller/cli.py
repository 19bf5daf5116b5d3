"""The `shardserve` command: one subcommand per module, each module owns its flags."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Each module defines register(subparsers) -> adds its subcommand with set_defaults(func=...).
COMMAND_MODULES = [
    "controller.server",
    "controller.clients.generate",
    "controller.acquire.demo_model",
    "controller.clients.admin",
    "controller.acquire.partition",
    "controller.clients.bench",
    "controller.acquire.download_command",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardserve", description="Serve large language models over gRPC.")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
