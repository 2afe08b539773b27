"""Daemon logging: stderr (systemd-friendly) plus a rotating file in the home, and an
optional compact live status line at the bottom of a terminal.

When stderr is a TTY, ``LiveLine`` keeps one line (state, requests/s, ...) redrawn in place;
the stderr handler erases it before printing a log record and redraws it afterwards, so
logs and the live line never interleave. When stderr is not a TTY there is no live line and
records are plain timestamped lines.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
import threading
from pathlib import Path
from typing import TextIO

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
TTY_FORMAT = "%(asctime)s %(levelname)-7s %(message)s"
LOGGER_NAME = "volunteer"


class LiveLine:
    """One line redrawn in place at the bottom of a terminal."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.text = ""
        self.lock = threading.RLock()

    def update(self, text: str) -> None:
        with self.lock:
            self.text = text
            self._draw()

    def clear(self) -> None:
        with self.lock:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def _draw(self) -> None:
        self.stream.write("\r\x1b[K" + self.text)
        self.stream.flush()

    def finish(self) -> None:
        with self.lock:
            if self.text:
                self.clear()
            self.text = ""


class _LiveAwareHandler(logging.StreamHandler):  # type: ignore[type-arg]
    def __init__(self, stream: TextIO, live: LiveLine | None) -> None:
        super().__init__(stream)
        self.live = live

    def emit(self, record: logging.LogRecord) -> None:
        if self.live is None:
            super().emit(record)
            return
        with self.live.lock:
            self.live.clear()
            super().emit(record)
            if self.live.text:
                self.live._draw()


def setup_logging(level: str, log_file: Path, live: bool) -> LiveLine | None:
    """Configure the ``volunteer`` logger; returns the live line when one is shown."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level.upper())
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    line = LiveLine(sys.stderr) if live else None
    stderr = _LiveAwareHandler(sys.stderr, line)
    stderr.setFormatter(logging.Formatter(TTY_FORMAT if live else FORMAT, "%H:%M:%S" if live else None))
    logger.addHandler(stderr)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    file_handler = logging.handlers.RotatingFileHandler(log_file, maxBytes=10 * 2**20, backupCount=3)
    file_handler.setFormatter(logging.Formatter(FORMAT))
    logger.addHandler(file_handler)
    return line


def close_logging() -> None:
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
