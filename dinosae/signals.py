"""Stop cleanly on SIGTERM/SIGINT: Slurm sends SIGTERM at the time limit; a long job then
finishes the unit of work it is on, writes what it has, and exits."""

from __future__ import annotations

import logging
import signal

log = logging.getLogger("dinosae")


class StopFlag:
    """`.stop` becomes True when SIGTERM or SIGINT arrives; `restore()` puts the old handlers
    back."""

    def __init__(self) -> None:
        self.stop = False
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame) -> None:  # noqa: ANN001
        log.warning("received signal %d: checkpointing and stopping", signum)
        self.stop = True

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
