"""A systemd unit that runs ``volunteer join`` as a service, and the systemctl calls around it.

``render_unit(spec)`` writes the unit text for a ``UnitSpec``: ``ExecStart`` runs this very
interpreter (``sys.executable -m volunteer join EXPERIMENT --home HOME ...``), so the service
uses the same installation (virtual environment included) as the command that installed it;
``Restart=on-failure`` brings a crashed node back but not one that left, nor one that
exits with code 2 (bad input: ``RestartPreventExitStatus``, it would fail again); the stop is a
graceful leave: ``KillSignal=SIGTERM`` goes to the daemon alone (``KillMode=mixed``) and
``TimeoutStopSec`` is the leave deadline plus ``STOP_MARGIN_S`` (the checkpoint and the
hand-offs that follow the drain), so systemd never kills a node that is still handing its
experts over. A user unit (``~/.config/systemd/user``, ``WantedBy=default.target``) needs
no root; a system-wide one (``user`` set: ``User=``, ``WantedBy=multi-user.target``, after
``network-online.target``) is printed for the administrator to install.

Arguments in ``ExecStart`` are quoted for systemd (its own rules: ``%`` specifiers and ``$``
expansions escaped, double quotes with C escapes for anything unusual); a newline or other
control character in any value is refused (``ServiceError``), since it would end the line.

``run_systemctl(args)`` runs ``systemctl --user ...`` (or system-wide), returning None when
there is no systemctl on PATH (containers, other init systems): the caller then says what
to run instead; ``manager_unreachable(proc)`` tells a systemctl that found no manager to talk
to ("Failed to connect to bus") from one that failed at its task.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

UNIT_PREFIX = "volunteer-"
STOP_MARGIN_S = 120.0  # checkpoint + hand-offs after the drain deadline (as ``volunteer leave`` allows)
RESTART_SEC = 10
SYSTEMCTL_TIMEOUT_S = 600.0  # ``disable --now`` waits for the graceful leave
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
_SAFE = re.compile(r"^[A-Za-z0-9_@+=:,./-]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# a POSIX portable user name (letters, digits, '.', '_', '-'; not starting with '-', '.' or
# a digit: systemd reads an all-digit User= as a uid), at most 32 characters
_USER = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")
BAD_INPUT_EXIT = 2  # ``volunteer join``'s exit code for bad input (cli.console.EXIT_BAD_INPUT)


class ServiceError(Exception):
    """A bad service name or argument; ``str(err)`` is one line."""


@dataclass(frozen=True)
class UnitSpec:
    """What the unit runs. ``user``: None for a user unit, a login name for a system unit."""

    name: str  # the part after ``volunteer-``: volunteer-<name>.service
    experiment: str  # a shipped experiment's name or an absolute manifest path
    home: Path
    python: str
    leave_timeout_s: float
    join_args: tuple[str, ...] = ()
    user: str | None = None
    environment: Mapping[str, str] = field(default_factory=dict)

    @property
    def unit(self) -> str:
        return unit_file_name(self.name)


def service_name(experiment: str) -> str:
    """The default service name for an experiment's name (``experiment.name`` in its manifest,
    not the manifest file's name), with anything systemd would not take replaced by ``-``."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", experiment).strip("-.") or "node"
    return name[:100]


def unit_file_name(name: str) -> str:
    """``volunteer-<name>.service``; ``ServiceError`` for a name systemd would not take."""
    if not _NAME.match(name):
        raise ServiceError(f"service name {name!r}: use 1-100 letters, digits, '_', '.' or '-'")
    return f"{UNIT_PREFIX}{name}.service"


def check_user_name(user: str) -> str:
    """``user`` when it is a valid login name for ``User=``, else ``ServiceError``."""
    if not _USER.match(user):
        raise ServiceError(f"--user {user[:40]!r}: not a user name (letters, digits, '_', '.' or '-', "
                           "starting with a letter or '_', at most 32 characters)")
    return user


def exec_quote(arg: str) -> str:
    """One ``ExecStart`` argument, quoted for systemd (see module docstring)."""
    if _CONTROL.search(arg):
        raise ServiceError(f"argument {arg[:40]!r} holds a control character (newline, tab, ...)")
    if arg and _SAFE.match(arg):
        return arg
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"'


def _env_line(key: str, value: str) -> str:
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key) or _CONTROL.search(value):
        raise ServiceError(f"environment {key}={value[:40]!r}: bad name or a control character")
    text = f"{key}={value}".replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'Environment="{text}"'


def _path_value(path: Path) -> str:
    text = str(path)
    if _CONTROL.search(text):
        raise ServiceError(f"path {text[:60]!r} holds a control character")
    return text.replace("%", "%%")


def render_unit(spec: UnitSpec) -> str:
    """The unit file's text (see module docstring)."""
    unit_file_name(spec.name)
    argv = [spec.python, "-m", "volunteer", "join", spec.experiment, "--home", str(spec.home),
            *spec.join_args]
    exec_start = " ".join(exec_quote(a) for a in argv)
    stop_s = math.ceil(spec.leave_timeout_s + STOP_MARGIN_S)
    system = spec.user is not None
    where = "print it again" if system else "remove it with `volunteer service uninstall " \
        f"--name {spec.name}`"
    lines = [
        f"# Written by `volunteer service install`; {where}.",
        "[Unit]",
        f"Description=volunteer node: experiment {spec.experiment} (home {_path_value(spec.home)})",
    ]
    if system:
        lines += ["Wants=network-online.target", "After=network-online.target"]
    lines += [
        "",
        "[Service]",
        "Type=simple",
        f"ExecStart={exec_start}",
        f"WorkingDirectory={_path_value(spec.home)}",
        _env_line("VOLUNTEER_HOME", str(spec.home)),
        _env_line("PYTHONUNBUFFERED", "1"),
        *(_env_line(k, v) for k, v in sorted(spec.environment.items())),
        "Restart=on-failure",
        f"RestartSec={RESTART_SEC}",
        "# bad input (manifest, settings, arguments) fails the same way at every start: no restart",
        f"RestartPreventExitStatus={BAD_INPUT_EXIT}",
        "# a graceful leave: SIGTERM to the daemon only, and time to drain, checkpoint and hand off",
        "KillSignal=SIGTERM",
        "KillMode=mixed",
        f"TimeoutStopSec={stop_s}",
    ]
    if system:
        lines.append(f"User={check_user_name(spec.user or '')}")
    lines += ["", "[Install]", f"WantedBy={'multi-user.target' if system else 'default.target'}", ""]
    return "\n".join(lines)


def user_unit_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CONFIG_HOME/systemd/user`` (default ``~/.config/systemd/user``)."""
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME") or ""
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".config"
    return root / "systemd" / "user"


def installed_units(directory: Path) -> list[str]:
    """Names (``<name>`` of ``volunteer-<name>.service``) of the units in ``directory``."""
    try:
        files = sorted(p.name for p in directory.iterdir())
    except OSError:
        return []
    return [f[len(UNIT_PREFIX):-len(".service")] for f in files
            if f.startswith(UNIT_PREFIX) and f.endswith(".service")]


def run_systemctl(args: Sequence[str], user: bool = True,
                  timeout: float = SYSTEMCTL_TIMEOUT_S) -> subprocess.CompletedProcess | None:
    """``systemctl [--user] ARGS`` (output captured as text); None without systemctl."""
    exe = shutil.which("systemctl")
    if exe is None:
        return None
    cmd = [exe, *(["--user"] if user else []), *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return subprocess.CompletedProcess(cmd, 1, "", f"{type(e).__name__}: {e}")


_NO_MANAGER = ("failed to connect to bus", "failed to connect to user scope bus", "not been booted with systemd",
               "xdg_runtime_dir not defined", "dbus_session_bus_address")


def manager_unreachable(proc: subprocess.CompletedProcess) -> bool:
    """True when systemctl failed because no (user) service manager answers here: no session
    bus (a root shell, ssh without a login session, a container), or systemd is not the init
    system. Nothing can be running under a manager that is not there."""
    text = f"{proc.stderr or ''} {proc.stdout or ''}".lower()
    return proc.returncode != 0 and any(marker in text for marker in _NO_MANAGER)


def systemctl_error(proc: subprocess.CompletedProcess) -> str:
    """The last line systemctl wrote (its error), for a one-line message."""
    text = (proc.stderr or proc.stdout or "").strip().splitlines()
    return text[-1] if text else f"exit code {proc.returncode}"
