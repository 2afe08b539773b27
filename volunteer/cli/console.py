"""Output and errors for every command: one console object each for stdout and stderr.

Exit codes (documented in ``volunteer --help``):

- 0  success
- 1  the operation failed or was cut short (e.g. a leave that missed its deadline)
- 2  bad input: manifest, settings, flags or device (the message names what to fix)
- 3  no daemon is running on this home
- 4  another daemon already runs on this home
- 130 forced exit (second SIGINT/SIGTERM during a leave)

Domain errors become ``error: <one line>`` on stderr; no traceback is shown for them.
``NO_COLOR`` is honoured (rich reads it), and output is plain when the stream is no TTY.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import typer
from rich.console import Console

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_NOT_RUNNING = 3
EXIT_ALREADY_RUNNING = 4
EXIT_FORCED = 130


def stdout_console() -> Console:
    return Console(highlight=False, no_color="NO_COLOR" in os.environ or None)


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False, no_color="NO_COLOR" in os.environ or None)


def fail(message: str, code: int) -> typer.Exit:
    """Print ``error: message`` on stderr and return the ``typer.Exit`` to raise."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    return typer.Exit(code)


@contextlib.contextmanager
def domain_errors() -> Iterator[None]:
    """Turn the known error types of the daemon layers into one line + exit code."""
    from volunteer.daemon.control_client import (
        ControlError,
        DaemonNotRunningError,
        DaemonStartingError,
    )
    from volunteer.daemon.hardware import DeviceError
    from volunteer.daemon.home import HomeLockedError
    from volunteer.daemon.settings import SettingsError
    from volunteer.manifest import ManifestError

    try:
        yield
    except (ManifestError, SettingsError, DeviceError) as exc:
        raise fail(str(exc), EXIT_BAD_INPUT) from None
    except DaemonNotRunningError as exc:
        raise fail(str(exc), EXIT_NOT_RUNNING) from None
    except DaemonStartingError as exc:
        raise fail(str(exc), EXIT_NOT_RUNNING) from None
    except HomeLockedError as exc:
        raise fail(str(exc), EXIT_ALREADY_RUNNING) from None
    except ControlError as exc:
        raise fail(f"the daemon answered: {exc}", EXIT_FAILED) from None
    except OSError as exc:  # e.g. a --home that is a file, or not writable
        where = f"{exc.filename}: " if exc.filename else ""
        raise fail(f"{where}{exc.strerror or exc}", EXIT_FAILED) from None
