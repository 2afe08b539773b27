"""The hypothesis budget shared by the fuzz targets: small in CI, raised for long runs.

Every target is decorated with ``@fuzz_settings()`` (or ``fuzz_settings(scale)`` for
targets whose examples cost a socket round trip). The default, 200 examples per target
and no per-example deadline (no timing asserts; a slow CI box must not fail a test),
keeps the whole ``tests/fuzz`` folder well under 60 s. Long runs raise it::

    VOLUNTEER_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest -q tests/fuzz

The settings are applied per test (not through a global profile), so loading this module
never changes hypothesis settings for other test folders. The example database is off so
that a CI run is reproducible from the seed hypothesis prints on failure.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

EXAMPLES_ENV = "VOLUNTEER_FUZZ_EXAMPLES"
DEFAULT_EXAMPLES = 200


def fuzz_examples() -> int:
    """Examples per target: ``$VOLUNTEER_FUZZ_EXAMPLES`` if set (>= 1), else 200."""
    raw = os.environ.get(EXAMPLES_ENV, "").strip()
    return max(1, int(raw)) if raw else DEFAULT_EXAMPLES


def fuzz_settings(scale: float = 1.0) -> settings:
    """Hypothesis settings for one target: ``scale`` x the example budget, no deadline."""
    return settings(
        max_examples=max(1, int(fuzz_examples() * scale)),
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.function_scoped_fixture],
    )
