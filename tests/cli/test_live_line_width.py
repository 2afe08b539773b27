"""The live line under ``volunteer join`` stays one row at 60, 80 and 120 columns, also across
a resize (a real daemon subprocess on a pty, its output replayed on a tiny terminal emulator).

A line wider than the terminal wraps; ``\\r`` then returns only to the start of its last row,
so each redraw used to leave a row behind. The emulator below keeps what a terminal keeps
(rows, cursor, auto-wrap at the right margin) and records every wrap that happened while the
live line was being drawn, and which rows end up holding live-line text.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from rich.cells import cell_len, get_character_cell_size

from tests.conftest import cli_env
from volunteer.daemon.logs import LiveLine, fit_line

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs a pty")

DEADLINE_S = 90.0
CSI = re.compile(r"\x1b\[([0-9;?]*)([@-~])")
LIVE_START = "\r\x1b[2K["  # a live-line draw: clear the row, then "[state] ..."


class Term:
    """A minimal terminal: printable characters (by cell width), ``\\r``, ``\\n``, ``ESC[2K``,
    ``ESC[K``; other escape sequences are ignored. Auto-wraps like xterm (deferred wrap)."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.rows: list[list[str]] = [[]]
        self.row = 0
        self.col = 0
        self.live_wraps: list[str] = []  # rows that wrapped while holding live-line text
        self.longest = 0

    def resize(self, width: int) -> None:
        """A terminal that does not reflow: rows keep their text, the cursor stays in bounds."""
        self.width = width
        self.col = min(self.col, width)

    def feed(self, text: str) -> None:
        i = 0
        while i < len(text):
            m = CSI.match(text, i)
            if m:
                self._csi(m.group(1), m.group(2))
                i = m.end()
                continue
            ch = text[i]
            i += 1
            if ch == "\r":
                self.col = 0
            elif ch == "\n":
                self._down()
            elif ch == "\x1b" or ch < " ":
                continue
            else:
                self._put(ch)

    def _csi(self, params: str, final: str) -> None:
        line = self.rows[self.row]
        if final == "K" and params == "2":
            line.clear()
        elif final == "K" and params in ("", "0"):
            del line[self.col:]

    def _down(self) -> None:
        self.row += 1
        if self.row == len(self.rows):
            self.rows.append([])

    def _put(self, ch: str) -> None:
        size = get_character_cell_size(ch)
        if self.col + size > self.width:  # the right margin: wrap to the next row
            if self.text(self.row).startswith("["):
                self.live_wraps.append(self.text(self.row))
            self._down()
            self.col = 0
        line = self.rows[self.row]
        line.extend([" "] * (self.col - len(line)))
        line[self.col:self.col + 1] = [ch] + [""] * (size - 1)
        self.col += size
        self.longest = max(self.longest, self.col)

    def text(self, row: int) -> str:
        return "".join(self.rows[row]).rstrip()

    def live_rows(self) -> list[str]:
        return [self.text(r) for r in range(len(self.rows)) if re.match(r"\[(serving|starting)\]", self.text(r))]


def set_size(fd: int, columns: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))


class PtyDaemon:
    """``volunteer join demo`` with stdout/stderr on a pty of a given width."""

    def __init__(self, home: Path, columns: int) -> None:
        self.master, slave = pty.openpty()
        set_size(slave, columns)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "volunteer", "join", "demo", "--home", str(home), "--set", "network_enabled=false"],
            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=cli_env(), start_new_session=True)
        os.close(slave)
        self.output = ""

    def read_some(self, timeout: float) -> str:
        """What the daemon wrote within ``timeout`` seconds ('' at EOF or when nothing came)."""
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return ""
        try:
            data = os.read(self.master, 65536).decode(errors="replace")
        except OSError as e:  # EIO: the child closed the pty
            if e.errno != errno.EIO:
                raise
            return ""
        self.output += data
        return data

    def read_draws(self, count: int) -> str:
        """Read until ``count`` more live-line draws arrived; returns what was read."""
        start, deadline = len(self.output), time.monotonic() + DEADLINE_S
        while self.output[start:].count(LIVE_START) < count:
            if self.proc.poll() is not None:
                self.read_some(0.1)
                raise AssertionError(f"join exited with {self.proc.returncode}:\n{self.output[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {count} live-line draws within {DEADLINE_S}s:\n{self.output[-3000:]}")
            self.read_some(1.0)
        return self.output[start:]

    def drain_stopped(self) -> str:
        """Stop the daemon and read everything it wrote before it stopped."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        os.waitpid(self.proc.pid, os.WUNTRACED)
        start = len(self.output)
        while self.read_some(0.0):
            pass
        return self.output[start:]

    def leave(self) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.send_signal(signal.SIGINT)
            deadline = time.monotonic() + DEADLINE_S
            while self.proc.poll() is None and time.monotonic() < deadline:
                self.read_some(0.5)  # keep the pty drained so the daemon never blocks writing
        try:
            return self.proc.wait(timeout=30)
        finally:
            os.close(self.master)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def check_one_row(term: Term, text: str, columns: int) -> None:
    term.feed(text)
    assert term.live_wraps == [], f"the live line wrapped at {columns} columns: {term.live_wraps}"
    assert term.longest <= term.width
    assert len(term.live_rows()) == 1, f"live line on several rows at {columns} columns: {term.live_rows()}"


@pytest.mark.parametrize("columns", [60, 80, 120])
def test_live_line_stays_one_row(tmp_path: Path, columns: int) -> None:
    daemon = PtyDaemon(tmp_path / "home", columns)
    try:
        text = daemon.read_draws(4)
        term = Term(columns)
        check_one_row(term, daemon.output, columns)
        draws = [d.split("\r")[0].split("\n")[0] for d in text.split(LIVE_START)[1:]]
        assert all(len(d) + 1 <= columns - 1 for d in draws)  # +1: the "[" the split took
        if columns == 60:  # the demo's line is longer than 60 columns: it was cut, not wrapped
            assert any(d.endswith("\u2026") for d in draws), draws
        if columns == 120:  # then the window shrinks: the next draws fit the new width
            check_one_row(term, daemon.drain_stopped(), columns)
            set_size(daemon.master, 60)
            term.resize(60)
            os.kill(daemon.proc.pid, signal.SIGWINCH)  # delivered when it continues
            os.kill(daemon.proc.pid, signal.SIGCONT)
            after = daemon.read_draws(4)
            # at most one draw was computed before the signal arrived (the daemon was stopped
            # between two draws or inside one): check from the second draw on
            second = after.index(LIVE_START, after.index(LIVE_START) + 1)
            check_one_row(Term(60), after[second:], 60)
    except BaseException:
        daemon.kill()
        raise
    assert daemon.leave() == 0, daemon.output[-3000:]


def test_fit_line_counts_display_cells() -> None:
    assert fit_line("abc", 10) == "abc"
    cut = fit_line("日本語" * 10, 11)
    assert cut.endswith("\u2026") and sum(get_character_cell_size(c) for c in cut) <= 11
    assert fit_line("a\nb\x1b[31m", 20) == "a b [31m"  # no control character reaches the terminal
    assert fit_line("x" * 30, 10, ascii_only=True) == "xxxxxxx..."


def test_winch_handler_chains_the_previous_one_and_is_restored() -> None:
    master, slave = pty.openpty()
    set_size(slave, 100)
    calls: list[int] = []
    previous = signal.signal(signal.SIGWINCH, lambda signum, frame: calls.append(signum))
    mine = signal.getsignal(signal.SIGWINCH)
    try:
        with os.fdopen(slave, "w", encoding="utf-8", closefd=True) as stream:
            live = LiveLine(stream)
            assert live.width() == 100 and signal.getsignal(signal.SIGWINCH) != mine
            live.update("x" * 300)
            assert cell_len(live.fitted()) == 99 and live.fitted().endswith("\u2026")
            set_size(slave, 50)
            assert live.width() == 100  # measured once, until the terminal says it changed
            signal.raise_signal(signal.SIGWINCH)
            assert calls == [signal.SIGWINCH]  # the handler it replaced still runs
            assert live.width() == 50 and cell_len(live.fitted()) == 49
            live.finish()
            assert signal.getsignal(signal.SIGWINCH) is mine
            while select.select([master], [], [], 0)[0]:
                os.read(master, 65536)
    finally:
        signal.signal(signal.SIGWINCH, previous)
        os.close(master)


def test_no_handler_off_a_terminal_or_off_the_main_thread() -> None:
    import io
    import threading

    before = signal.getsignal(signal.SIGWINCH)
    LiveLine(io.StringIO())
    assert signal.getsignal(signal.SIGWINCH) is before
    master, slave = pty.openpty()
    try:
        with os.fdopen(slave, "w", encoding="utf-8") as stream:
            worker = threading.Thread(target=LiveLine, args=(stream,))
            worker.start()
            worker.join()
            assert signal.getsignal(signal.SIGWINCH) is before
    finally:
        os.close(master)
