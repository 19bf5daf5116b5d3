"""A longer fuzz run of tests/fuzz (the same properties, more examples, random seeds).

    python bench/fuzz.py --examples 2000 [--seed N] [-k generate]

Prints the pytest summary; exit status is pytest's (non-zero: a counterexample, printed by hypothesis)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=1000, help="hypothesis examples per property")
    ap.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random)")
    ap.add_argument("-k", default=None, help="pytest -k expression: which properties")
    a = ap.parse_args()
    env = {**os.environ, "SHARDSERVE_FUZZ_EXAMPLES": str(a.examples), "SHARDSERVE_FUZZ_RANDOM": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(ROOT / "tests" / "fuzz")]
    if a.seed is not None:
        cmd += [f"--hypothesis-seed={a.seed}"]
    if a.k:
        cmd += ["-k", a.k]
    return subprocess.call(cmd, cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
