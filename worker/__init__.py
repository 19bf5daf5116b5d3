"""The worker plane: one process per rank (`python -m worker ROLE --config JSON`). Importing the package
pulls in no torch; worker/config.py (the launch contract) is torch-free too, so the controller imports it."""
