"""Logging for every raylong process (CLI, job driver, Ray Data and Ray Train workers).

`get_logger(__name__)` returns a logger under "raylong" whose records are written to the process's
current stdout as `[raylong] message` (Ray forwards worker stdout to the driver), at INFO. The handler
is attached once, to the "raylong" logger only, so other libraries' logging is left as it is.
"""

from __future__ import annotations

import logging
import sys

ROOT = "raylong"
FORMAT = "[raylong] %(message)s"


class _CurrentStdout(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time of the record (pytest and Ray replace it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.setStream(sys.stdout)
        super().emit(record)


def get_logger(name: str) -> logging.Logger:
    root = logging.getLogger(ROOT)
    if not any(isinstance(h, _CurrentStdout) for h in root.handlers):
        handler = _CurrentStdout(sys.stdout)
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False  # one line per record, whatever the root logger does
    return logging.getLogger(name if name.startswith(ROOT) else f"{ROOT}.{name}")
