"""The worker plane: one process per rank (`python -m worker`). Importing the package pulls in no
torch, so the controller can read the worker's exit codes from here."""

# Exit code of a worker whose native kernels failed the warm-up of a process group: ranks cannot
# switch kernel paths mid-collective, so the controller (controller/fleet/replica.py) restarts every rank
# with SHARDSERVE_NATIVE=0.
NATIVE_WARMUP_EXIT = 4
