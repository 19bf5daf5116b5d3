"""Builds the native kernels ahead of time into native/_build/ (run by `make native`).

CPU extension: native/csrc/cpu/*.cpp, compiled for a plain x86-64 baseline with -O3 and OpenMP;
AVX2 / AVX-512 code paths are chosen at run time from the CPU's flags, so the build is portable
(no -march=native). CUDA extension: native/csrc/cuda/*.cu + bindings.cpp, only when torch has CUDA. Both
register implementations of the one operator namespace torch.ops.shardserve, whose schemas the CPU
library defines (native/csrc/include/op_schemas.h), so the CUDA library needs the CPU one loaded.

Never fails the install: any error prints a warning and exits 0, and ops.py then runs the plain
torch path. A stamp (BUILD_INFO.json) records the source hash and torch version; an unchanged tree
skips the build, and ops.py refuses a library whose stamp does not match the sources.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

NATIVE_DIR = Path(__file__).resolve().parent
BUILD_DIR = NATIVE_DIR / "_build"
CPU_SRC = NATIVE_DIR / "csrc" / "cpu"
CUDA_SRC = NATIVE_DIR / "csrc" / "cuda"
CPU_NAME = "shardserve_native_cpu"
CUDA_NAME = "shardserve_native_cuda"
# Baseline flags only: the kernels pick AVX2 / AVX-512 at run time (see csrc/cpu/isa.cpp).
CPU_CFLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-Wno-unknown-pragmas"]
CPU_LDFLAGS = ["-fopenmp"]
CUDA_CFLAGS = ["-O3", "--use_fast_math", "-lineinfo"]


SHARED_INCLUDE = NATIVE_DIR / "csrc" / "include"  # the operator schemas (both stamps hash it)


def cpu_sources() -> list[Path]:
    return sorted(CPU_SRC.glob("*.cpp"))


def cuda_sources() -> list[Path]:
    return sorted(CUDA_SRC.glob("*.cu")) + sorted(CUDA_SRC.glob("*.cpp"))


def source_hash(paths: list[Path], extra: str = "") -> str:
    """sha256 over every source and header in the folders of `paths`, plus the flags."""
    h = hashlib.sha256(extra.encode())
    folders = sorted({p.parent for p in paths} | {SHARED_INCLUDE})
    for folder in folders:
        for f in sorted(folder.iterdir()):
            if f.suffix in {".cpp", ".h", ".cu", ".cuh"}:
                h.update(f.name.encode())
                h.update(f.read_bytes())
    return h.hexdigest()


def stamp_info(kind: str) -> dict:
    """What a library of `kind` ("cpu" / "cuda") must have been built from to be used."""
    import torch

    if kind == "cpu":
        digest = source_hash(cpu_sources(), " ".join(CPU_CFLAGS))
    else:
        digest = source_hash(cuda_sources(), " ".join(CUDA_CFLAGS))
    return {"sources": digest, "torch": torch.__version__, "python": sys.version.split()[0]}


def library_path(kind: str) -> Path:
    name = CPU_NAME if kind == "cpu" else CUDA_NAME
    return BUILD_DIR / kind / f"{name}.so"


def stamp_path(kind: str) -> Path:
    return BUILD_DIR / kind / "BUILD_INFO.json"


def is_current(kind: str) -> bool:
    """True when the built library exists and its stamp matches the sources and torch."""
    try:
        stamp = json.loads(stamp_path(kind).read_text())
    except (OSError, ValueError):
        return False
    return library_path(kind).exists() and stamp.get("info") == stamp_info(kind)


def _build(kind: str, verbose: bool) -> float:
    from torch.utils import cpp_extension

    out_dir = BUILD_DIR / kind
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp_path(kind).unlink(missing_ok=True)
    # cpp_extension waits forever on a lock file left by a build that was killed; we are the only
    # builder of this folder (make native / bench/gpu/native_check.py), so a lock here is stale.
    (out_dir / "lock").unlink(missing_ok=True)
    os.environ.setdefault("MAX_JOBS", str(max(1, os.cpu_count() or 1)))
    t0 = time.perf_counter()
    if kind == "cpu":
        cpp_extension.load(
            name=CPU_NAME,
            sources=[str(p) for p in cpu_sources()],
            extra_cflags=CPU_CFLAGS,
            extra_ldflags=CPU_LDFLAGS,
            build_directory=str(out_dir),
            is_python_module=False,
            verbose=verbose,
        )
    else:
        if "TORCH_CUDA_ARCH_LIST" not in os.environ:
            import torch

            if torch.cuda.is_available():
                major, minor = torch.cuda.get_device_capability()
                os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        cpp_extension.load(
            name=CUDA_NAME,
            sources=[str(p) for p in cuda_sources()],
            extra_cflags=["-O3"],
            extra_cuda_cflags=CUDA_CFLAGS,
            build_directory=str(out_dir),
            is_python_module=False,
            verbose=verbose,
        )
    seconds = time.perf_counter() - t0
    stamp = {"info": stamp_info(kind), "build_seconds": round(seconds, 1)}
    stamp_path(kind).write_text(json.dumps(stamp, indent=1) + "\n")
    return seconds


def build(kind: str, force: bool = False, verbose: bool = False) -> bool:
    """Builds one extension; returns True when a current library is in place. Never raises."""
    try:
        if not force and is_current(kind):
            print(f"native: {kind} extension up to date ({library_path(kind)})")
            return True
        print(f"native: building the {kind} extension into {library_path(kind).parent} ...", flush=True)
        seconds = _build(kind, verbose)
        print(f"native: {kind} extension built in {seconds:.1f} s")
        return True
    except Exception as exc:  # noqa: BLE001 - a failed build must never fail the install
        msg = str(exc).strip().splitlines()
        tail = "\n  ".join(msg[-15:]) if msg else type(exc).__name__
        print(
            f"WARNING: native {kind} extension not built; the torch path will be used.\n  {tail}",
            file=sys.stderr,
        )
        return False


def cuda_wanted() -> bool:
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:  # noqa: BLE001
        return False
    return bool(torch.version.cuda) and CUDA_HOME is not None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("--verbose", action="store_true", help="show compiler commands")
    parser.add_argument("--cpu-only", action="store_true", help="skip the CUDA extension")
    parser.add_argument("--cuda-only", action="store_true", help="skip the CPU extension")
    args = parser.parse_args(argv)
    try:
        import torch  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        print(f"WARNING: torch not importable ({exc}); native kernels not built", file=sys.stderr)
        return 0
    if not args.cuda_only:
        build("cpu", args.force, args.verbose)
    if not args.cpu_only:
        if cuda_wanted():
            build("cuda", args.force, args.verbose)
        elif args.cuda_only:
            print("WARNING: no CUDA torch or CUDA toolkit here; CUDA extension not built", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
