"""Download progress: bytes done / total and the rate, as a bar on a terminal, a log line every 10 s
otherwise, or a callback (done, total) for the caller's own display (the admin API's phase)."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable

from controller.acquire.s3 import MiB

logger = logging.getLogger("controller.acquire.download")

# progress: True = bar on a terminal, log lines otherwise; False = silent; a callable gets (done, total) bytes.
Progress = bool | Callable[[int, int], None] | None


class Ticker:
    """Shows bytes done / total and the rate: a bar on a terminal, a log line every 10 s otherwise."""

    def __init__(
        self, label: str, total: int, base: int, files: int, probe: Callable[[], int], progress: Progress
    ):
        self.label, self.total, self.base, self.files, self.probe = label, total, base, files, probe
        self.callback = progress if callable(progress) else None
        self.bar = progress is True and sys.stderr.isatty()
        self.on = progress is not False and progress is not None or self.callback is not None
        self.done_files = 0
        self._best = base
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="download-progress", daemon=True)

    def __enter__(self) -> Ticker:
        if self.on:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
            self._emit(final=True)

    def _run(self) -> None:
        interval = 0.25 if self.bar or self.callback else 10.0
        while not self._stop.wait(interval):
            self._emit()

    def _emit(self, final: bool = False) -> None:
        self._best = min(self.total, max(self._best, self.probe()))  # never goes backwards
        if self.callback:
            self.callback(self._best, self.total)
            return
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        rate = (self._best - self.base) / MiB / elapsed  # this run's bytes only
        text = (
            f"{self._best / MiB:.1f}/{self.total / MiB:.1f} MiB, {rate:.1f} MiB/s, "
            f"{self.done_files}/{self.files} files"
        )
        if self.bar:
            width = 24
            filled = int(width * self._best / self.total) if self.total else width
            bar = "#" * filled + "-" * (width - filled)
            sys.stderr.write(f"\r{self.label} [{bar}] {text}  ")
            if final:
                sys.stderr.write("\n")
            sys.stderr.flush()
        elif not final:
            logger.info("downloading %s: %s", self.label, text)


