"""What the lab's helper programs share: JSON event lines on stdout and opt-in debug logs.

The tests read these lines (``LabProcess.wait_for``) to know when a program is ready, so a
program never has to be waited for by sleeping.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from collections.abc import Callable


def emit(event: str, **fields: object) -> None:
    """Print one machine-readable event line and flush it at once."""
    sys.stdout.write(json.dumps({"event": event, **fields}, default=str) + "\n")
    sys.stdout.flush()


def debug_logging() -> None:
    """NATLAB_DEBUG=logger1,logger2 turns those loggers to DEBUG on stderr."""
    names = [n for n in os.environ.get("NATLAB_DEBUG", "").split(",") if n]
    if names:
        logging.basicConfig(stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    for name in names:
        logging.getLogger(name).setLevel(logging.DEBUG)


def run_program(main: Callable[[], object]) -> None:
    """Run a lab program's ``main``; a crash becomes one ``error`` event and exit status 1,
    so the test waiting on this program's output sees why instead of timing out."""
    try:
        main()
    except KeyboardInterrupt:
        pass
    except Exception as e:
        emit("error", error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-3000:])
        sys.exit(1)
