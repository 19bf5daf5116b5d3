"""`shardserve bench`: the side-by-side benchmark (bench/run.py does the work)."""

from __future__ import annotations


def run(args) -> int:
    from bench.run import main

    return main(args)


def register(sub) -> None:
    p = sub.add_parser("bench", help="throughput and latency against transformers and CTranslate2")
    p.add_argument("--quick", action="store_true", help="demo model, 8 streams, 32 new tokens (< 3 minutes)")
    p.add_argument("--json", action="store_true", help='print {"results": [...]} on stdout (table on stderr)')
    p.add_argument("--out", default=None, help="also write the results as JSON to this file")
    p.add_argument("--cache-dir", default=None, help="models and conversions (default ~/.cache/shardserve/bench)")
    p.add_argument("--models", default=None, help="comma list of demo, llama-300m (default: by mode)")
    p.add_argument("--systems", default="shardserve,transformers,ctranslate2", help="comma list")
    p.add_argument("--sequential-limit", type=int, default=8,
                   help="requests transformers runs one at a time on the 300M model (0 = all, -1 = none)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for every system (0 = all cores)")
    p.add_argument("--quantize", default="", help="shardserve also serves with these, e.g. int8 (comma list)")
    p.add_argument("--streams", type=int, default=0,
                   help="concurrent streams instead of the mode's (32 full, 8 quick); 1 = the single-stream latency")
    p.add_argument("--rounds", type=int, default=0,
                   help="timed rounds per system, the median reported (0 = the mode's: 1 full, 5 quick)")
    p.add_argument("--in-process", action="store_true",
                   help="also time the engine in-process (bench.decode) at batch 1 and the stream count")
    p.set_defaults(func=run)
