"""Daemon logging: stderr (systemd-friendly) plus a rotating file in the home, and an
optional compact live status line at the bottom of a terminal.

When stderr is a TTY, ``LiveLine`` keeps one line (state, requests/s, ...) redrawn in place,
fitted to the terminal's width (re-measured on SIGWINCH) so that it never wraps;
the stderr handler erases it before printing a log record and redraws it afterwards, so
logs and the live line never interleave. When stderr is not a TTY there is no live line and
records are plain timestamped lines.
"""

from __future__ import annotations

import io
import logging
import logging.handlers
import os
import re
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any, TextIO

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
TTY_FORMAT = "%(asctime)s %(levelname)-7s %(message)s"
LOGGER_NAME = "volunteer"


class LiveLine:
    """One line redrawn in place at the bottom of a terminal, never wider than it.

    A line that wraps leaves a row behind at every redraw (``\\r`` only returns to the start of
    the last row), so the text is fitted to the terminal's current width: control characters
    become spaces, and a line too long is cut to ``width - 1`` display cells (wide CJK / emoji
    characters count as two, through rich's cell widths) ending in an ellipsis. The last
    column stays empty because some terminals wrap as soon as it is written. The width is read
    from the stream's terminal and read again after a SIGWINCH; the handler is installed only
    from the main thread and only on a TTY, chains the handler it replaces, and only marks the
    width stale (a signal handler must not write while another frame holds the lock): the
    next redraw (every supervisor tick) measures and redraws. A terminal that reflows text
    on shrinking may leave the old line's head on the row above once; nothing repeats.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.text = ""
        self.lock = threading.RLock()
        self._width: int | None = None
        self._previous_winch: Any = None
        self._winch_installed = False
        self._install_winch()

    def update(self, text: str) -> None:
        with self.lock:
            self.text = text
            self._draw()

    def clear(self) -> None:
        with self.lock:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()

    def width(self) -> int:
        """The terminal's width in cells (80 when the stream is not a terminal)."""
        if self._width is None:
            self._width = terminal_width(self.stream)
        return self._width

    def fitted(self) -> str:
        """The current text as it is drawn: one row of the current width."""
        return fit_line(self.text, self.width() - 1, ascii_only=not _can_encode(self.stream, ELLIPSIS))

    def _draw(self) -> None:
        self.stream.write("\r\x1b[2K" + self.fitted())
        self.stream.flush()

    def finish(self) -> None:
        with self.lock:
            if self.text:
                self.clear()
            self.text = ""
        self._uninstall_winch()

    def _on_winch(self, signum: int, frame: Any) -> None:
        self._width = None  # measured again at the next redraw
        previous = self._previous_winch
        if callable(previous):
            previous(signum, frame)

    def _install_winch(self) -> None:
        winch = getattr(signal, "SIGWINCH", None)
        if winch is None or threading.current_thread() is not threading.main_thread() or not _isatty(self.stream):
            return
        try:
            self._previous_winch = signal.getsignal(winch)
            signal.signal(winch, self._on_winch)
            self._winch_installed = True
        except (ValueError, OSError):  # not the main interpreter, or no signals here
            self._previous_winch = None

    def _uninstall_winch(self) -> None:
        if not self._winch_installed or threading.current_thread() is not threading.main_thread():
            return
        try:
            previous = self._previous_winch
            signal.signal(signal.SIGWINCH, previous if previous is not None else signal.SIG_DFL)
            self._winch_installed = False
        except (ValueError, OSError):
            pass


ELLIPSIS = "\u2026"


def terminal_width(stream: TextIO, default: int = 80) -> int:
    """Columns of the terminal behind ``stream`` (then of stdout's, then ``COLUMNS``)."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
        if columns > 0:
            return columns
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        pass
    return shutil.get_terminal_size((default, 24)).columns or default


def fit_line(text: str, cells: int, ascii_only: bool = False) -> str:
    """``text`` on one row of at most ``cells`` display cells: control characters (newlines,
    tabs, escapes) become spaces, and a longer text is cut with an ellipsis (``...`` when
    the stream cannot encode one)."""
    from rich.cells import cell_len, set_cell_size

    clean = _CONTROL.sub(" ", text)
    if cells <= 0:
        return ""
    if cell_len(clean) <= cells:
        return clean
    mark = "..." if ascii_only else ELLIPSIS
    room = cells - cell_len(mark)
    if room <= 0:
        return mark[:cells]
    return set_cell_size(clean, room).rstrip() + mark


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _can_encode(stream: TextIO, text: str) -> bool:
    try:
        text.encode(getattr(stream, "encoding", None) or "utf-8")
        return True
    except (UnicodeEncodeError, LookupError):
        return False


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
