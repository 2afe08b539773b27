"""Typed errors that travel on the wire as ``(code, message)`` and come back as exceptions.

Every failure a server hits is answered with an error reply carrying one of the fixed codes
below; clients turn the code back into the matching exception class with
:func:`error_from_code`, so callers can ``except OverloadedError`` and retry elsewhere.
"""

from __future__ import annotations


class RemoteError(Exception):
    """Base class: ``code`` is the wire code, ``message`` the server's (or client's) text."""

    code: str = "internal"

    def __init__(self, message: str = "", code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class UnknownExpertError(RemoteError):
    """The server hosts no expert with the requested uid."""

    code = "unknown_expert"


class BadRequestError(RemoteError):
    """Malformed request: garbage frames, wrong shape, dtype or number of tensors."""

    code = "bad_request"


class NonFiniteError(BadRequestError):
    """A request tensor holds NaN or infinity: refused before it reaches an expert."""

    code = "non_finite"


class GradientNormError(BadRequestError):
    """A backward's output gradient exceeds the experiment's per-sample norm bound
    (``serving.max_grad_norm``): refused before it reaches an expert."""

    code = "grad_norm"


class TooLargeError(RemoteError):
    """The request exceeds a hard limit (header bytes, tensors, elements, bytes, batch)."""

    code = "too_large"


class DeadlineExpiredError(RemoteError):
    """The request's deadline passed before it was computed; it was dropped."""

    code = "deadline_expired"


class OverloadedError(RemoteError):
    """The expert's queue is full; try another server or later."""

    code = "overloaded"


class DrainingError(RemoteError):
    """The node is leaving and accepts no new work."""

    code = "draining"


class PausedError(RemoteError):
    """The node is paused by its owner or one of its resource rules (``volunteer pause``,
    schedule, idle, battery, CPU): it keeps its experts loaded and finishes in-flight work
    but takes no new work. Not a fault of the server: try another replica, or later."""

    code = "paused"


class InternalError(RemoteError):
    """The server failed while computing; the message says why."""

    code = "internal"


class CacheMissError(RemoteError):
    """A backward sent without its inputs found no cached forward: resend it with inputs.
    ``RemoteExpert`` handles this itself; callers normally never see it."""

    code = "cache_miss"


class RemoteTimeoutError(RemoteError):
    """Raised client-side: no reply within the call's timeout."""

    code = "timeout"


class UnreachableError(RemoteError):
    """Raised client-side: the transport could not reach the peer."""

    code = "unreachable"


ERROR_CLASSES: dict[str, type[RemoteError]] = {
    cls.code: cls
    for cls in (
        UnknownExpertError,
        BadRequestError,
        NonFiniteError,
        GradientNormError,
        TooLargeError,
        DeadlineExpiredError,
        OverloadedError,
        DrainingError,
        PausedError,
        InternalError,
        CacheMissError,
        RemoteTimeoutError,
        UnreachableError,
    )
}


def error_from_code(code: str, message: str) -> RemoteError:
    """The exception for a wire error code; unknown codes give a plain RemoteError."""
    cls = ERROR_CLASSES.get(code)
    if cls is None:
        return RemoteError(message, code=str(code))
    return cls(message)
