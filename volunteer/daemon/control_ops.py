"""The control API's ops (``ControlServer`` handlers) of one supervisor: the op table.

``handlers(sup)`` maps op name -> callable(request dict) -> JSON result:

- ``status``: the health snapshot (``volunteer status``);
- ``ping``: pid and state (readiness checks);
- ``leave``: drain, checkpoint, hand off, stop; answers with the leave report
  (``volunteer leave``; ``timeout`` in [0, 3600] s);
- ``checkpoint``: checkpoint now (``force`` rewrites unchanged experts too);
- ``pause``: take no new work until ``resume`` (or for ``for_s`` seconds, at most 30 days);
  experts stay loaded, in-flight work finishes; answers the pause state;
- ``resume``: take work again at once, unless a resource rule still pauses the node (the
  answer says which).

Bad arguments are ``ControlRequestError("bad_request", ...)``, one line each.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from volunteer.daemon.control_server import ControlRequestError, Handler
from volunteer.daemon.rules import MAX_DURATION_S

if TYPE_CHECKING:
    from volunteer.daemon.supervisor import Supervisor

MAX_LEAVE_TIMEOUT_S = 3600.0


def _number(request: dict[str, Any], name: str, lo: float, hi: float) -> float | None:
    value = request.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ControlRequestError("bad_request", f"{name} must be a number in [{lo:g}, {hi:g}]")
    return float(value)


def handlers(sup: Supervisor) -> dict[str, Handler]:
    """The op table of ``sup`` (see the module docstring)."""

    def leave(request: dict[str, Any]) -> dict[str, Any]:
        timeout = _number(request, "timeout", 0.0, MAX_LEAVE_TIMEOUT_S)
        sup.request_leave(timeout, "leave command")
        if not sup.wait_left(sup.leave_timeout + 120.0):
            raise ControlRequestError("timeout", "the leave did not finish; see the daemon log")
        assert sup.leave_report is not None
        return sup.leave_report.as_dict()

    def checkpoint(request: dict[str, Any]) -> dict[str, Any]:
        if sup.state != "serving" or sup.checkpointer is None:
            raise ControlRequestError("not_serving", f"cannot checkpoint while {sup.state}")
        return sup.checkpointer.checkpoint(sup.runtime.exclusive, force=bool(request.get("force"))).as_dict()

    def pause(request: dict[str, Any]) -> dict[str, Any]:
        for_s = _number(request, "for_s", 1.0, MAX_DURATION_S)
        if sup.state != "serving":
            raise ControlRequestError("not_serving", f"cannot pause while {sup.state}")
        sup.pause.pause(for_s)
        return sup.pause.status()

    def resume(request: dict[str, Any]) -> dict[str, Any]:
        if sup.state != "serving":
            raise ControlRequestError("not_serving", f"cannot resume while {sup.state}")
        sup.pause.resume()
        return sup.pause.status()

    return {
        "status": lambda req: sup.snapshot(),
        "ping": lambda req: {"pid": os.getpid(), "state": sup.state},
        "leave": leave,
        "checkpoint": checkpoint,
        "pause": pause,
        "resume": resume,
    }
