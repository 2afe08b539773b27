"""``volunteer logs [-f] [-n N]``: the node's log file (``<home>/logs/volunteer.log``).

The daemon writes its log through a rotating handler (``volunteer.daemon.logs``: 10 MiB,
three old files). ``-n`` prints the last lines without reading the whole file (blocks from
the end); ``-f`` then follows it like ``tail -F``: it polls (four times a second; a CLI
waiting for text needs no more), reads what was appended, notices a rotation (the path now
names another file: the rest of the old one is printed first, then the new one from its
start) and a truncation (the file got shorter: read again from its start), and waits while
the path is briefly missing during a rotation. Ctrl-C ends it with exit code 0.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import BinaryIO, Optional

import typer

from volunteer.cli.console import EXIT_FAILED, fail

BLOCK = 64 * 1024
POLL_S = 0.25
MAX_LINES = 1_000_000


def tail_lines(fh: BinaryIO, n: int, end: int) -> bytes:
    """The last ``n`` lines of ``fh[:end]`` (a final line without newline counts as one)."""
    if n <= 0 or end <= 0:
        return b""
    pos = end
    data = b""
    while pos > 0:
        step = min(BLOCK, pos)
        pos -= step
        fh.seek(pos)
        data = fh.read(step) + data
        # one more newline than n: the text before it is cut (a trailing newline ends a line)
        if data.count(b"\n", 0, len(data) - 1) >= n:
            break
    lines = data.split(b"\n")
    trailing = data.endswith(b"\n")
    if trailing:
        lines = lines[:-1]
    out = b"\n".join(lines[-n:])
    return out + b"\n" if trailing else out


def _write(data: bytes) -> None:
    if data:
        sys.stdout.write(data.decode("utf-8", errors="replace"))
        sys.stdout.flush()


def follow(path: Path, fh: BinaryIO, pos: int) -> None:
    """Print what is appended to ``path`` from ``pos`` on, across rotations, until Ctrl-C."""
    ino = os.fstat(fh.fileno()).st_ino
    while True:
        fh.seek(pos)
        data = fh.read(BLOCK)
        if data:
            pos += len(data)
            _write(data)
            continue
        try:
            st = os.stat(path)
        except FileNotFoundError:  # between the rename and the new file of a rotation
            time.sleep(POLL_S)
            continue
        if st.st_ino != ino:  # rotated: the old file is drained (above); the new one from 0
            fh.close()
            try:
                fh = open(path, "rb")  # noqa: SIM115 - replaced at the next rotation
            except FileNotFoundError:
                time.sleep(POLL_S)
                continue
            ino, pos = os.fstat(fh.fileno()).st_ino, 0
            continue
        if st.st_size < pos:  # truncated in place
            pos = 0
            continue
        time.sleep(POLL_S)


def logs(
    home: Optional[Path] = typer.Option(None, "--home", envvar="VOLUNTEER_HOME", show_envvar=True,
                                        help="Node home whose log to show (default: the user data directory)."),
    lines: int = typer.Option(20, "-n", "--lines", min=0, max=MAX_LINES, help="How many of the last lines to print."),
    follow_: bool = typer.Option(False, "-f", "--follow", help="Keep printing lines as the node writes them "
                                                                 "(follows rotation; Ctrl-C to stop)."),
) -> None:
    """Print the last lines of the node's log (<home>/logs/volunteer.log); -f follows it."""
    from volunteer.daemon.home import NodeHome, resolve_home

    root = resolve_home(home)
    path = NodeHome(root).log_file
    try:
        fh = open(path, "rb")  # noqa: SIM115 - follow() replaces it on rotation
    except FileNotFoundError:
        raise fail(f"no log yet at {path}: it is written once `volunteer join` runs with this home "
                   "(pick another with --home or VOLUNTEER_HOME)", EXIT_FAILED) from None
    except OSError as e:
        raise fail(f"cannot read {path}: {e.strerror or e}", EXIT_FAILED) from None
    try:
        end = os.fstat(fh.fileno()).st_size
        _write(tail_lines(fh, lines, end))
        if follow_:
            follow(path, fh, end)
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
    except BrokenPipeError:  # e.g. piped into head
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(0) from None
    finally:
        fh.close()
