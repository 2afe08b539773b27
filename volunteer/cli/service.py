"""``volunteer service install|uninstall|status``: run a node as a systemd service.

The unit is built by ``volunteer.daemon.service_unit`` (see there for what it holds and why);
this module resolves the home, the experiment and the leave deadline, writes the user unit,
and runs ``systemctl --user`` when there is one, saying exactly what to run when there is not
(a container, another init system) or when it fails (no user session bus).
"""

from __future__ import annotations

import getpass
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from volunteer.cli.console import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_NOT_RUNNING, domain_errors, fail

HELP = """Run this node as a systemd service that starts at login (or boot) and restarts after a crash.

`volunteer service install demo` writes ~/.config/systemd/user/volunteer-demo.service and starts it; `volunteer service status` shows its state; `volunteer service uninstall` stops it (a graceful leave) and removes it. Follow its log with `volunteer logs -f`. For a system-wide service, `volunteer service install demo --print --user NAME` prints a unit to save under /etc/systemd/system/.

The service reads its settings from the home's config.yaml (`volunteer settings`), not from your shell's VOLUNTEER_* variables.
"""

service_app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False,
                          context_settings={"help_option_names": ["-h", "--help"]})

HOME_OPTION = typer.Option(None, "--home", envvar="VOLUNTEER_HOME", show_envvar=True,
                           help="Node home the service runs with (default: the user data directory; "
                                "with --print --user NAME, that account's).")
NAME_HELP = ("Service name: the unit is volunteer-NAME.service (default: the experiment's name, "
             "experiment.name in its manifest).")
PICK_HELP = ("Service name, as installed: the unit volunteer-NAME.service (default: the only volunteer "
             "service installed; needed when there are several).")


def _experiment_arg(experiment: str) -> str:
    """A shipped experiment's name as is, a manifest path made absolute (the service starts
    in the home, not here); ``typer.Exit`` when it is neither."""
    from volunteer.cli.join import shipped_experiments

    path = Path(experiment).expanduser()
    if path.is_file():
        return str(path.resolve())
    if "/" in experiment or experiment.endswith((".yaml", ".yml")):
        raise fail(f"manifest {experiment} not found; pass an existing file or the name of a shipped "
                   f"experiment ({', '.join(shipped_experiments()) or 'none'})", EXIT_BAD_INPUT)
    if experiment not in shipped_experiments():
        raise fail(f"unknown experiment {experiment!r}: pass a manifest path or one of "
                   f"{', '.join(shipped_experiments()) or 'none'}", EXIT_BAD_INPUT)
    return experiment


def _join_command() -> Any:
    """``volunteer join`` as the click command the CLI runs (its parser and conversions)."""
    from volunteer.cli.join import join

    app = typer.Typer(add_completion=False)
    app.command()(join)
    return typer.main.get_command(app)


def _check_join_args(experiment: str, join_args: list[str], root: Path, manifest: Any) -> Any:
    """Parse the arguments after ``--`` as ``volunteer join`` will, and resolve the settings
    the service will start with (``root``'s config.yaml and these flags, not this shell's
    VOLUNTEER_* variables) and its network section; the resolved ``Settings``.

    A bad argument is refused here, at install time, in one line: under systemd it would be
    exit code 2 at every start (``RestartPreventExitStatus`` keeps that from looping)."""
    from typer.exceptions import TyperException

    from volunteer.cli.join import flag_settings
    from volunteer.daemon.network import effective_network
    from volunteer.daemon.settings import SettingsError, parse_assignments, resolve_settings

    if any(a in ("--help", "-h") for a in join_args):
        raise fail("--help is not a join argument for a service; see `volunteer join --help`", EXIT_BAD_INPUT)
    try:
        params = _join_command().make_context("volunteer join", [experiment, *join_args]).params
    except (TyperException, typer.Exit) as e:
        text = e.format_message() if hasattr(e, "format_message") else str(e)
        raise fail(f"join arguments after `--`: {' '.join(text.split())}", EXIT_BAD_INPUT) from None
    with domain_errors():
        given = flag_settings(**{k: params[k] for k in ("device", "num_experts", "host", "port", "listen_host",
                                                        "listen_port", "announce", "public")})
        flags = {**parse_assignments(params["set_"]), **{k: v for k, v in given.items() if v is not None}}
        settings = resolve_settings(root / "config.yaml", {}, flags)
        if (params["bootstrap"] or params["new_swarm"]) and not settings.network_enabled:
            raise SettingsError("--bootstrap/--new-swarm need the peer network, but network_enabled is false")
        effective_network(manifest.network, params["bootstrap"], params["new_swarm"], settings, manifest.source)
    return settings


def _system_home(user: str) -> Path:
    """The default home of ``user`` (another account, for ``--print --user``): the same data
    directory below their home directory as ours is below ours; one-line error when the
    account does not exist."""
    import pwd

    from volunteer.daemon.home import default_home

    try:
        account = pwd.getpwnam(user)
    except KeyError:
        raise fail(f"--user {user}: no such user on this machine; create the account first, or pass "
                   "--home for the unit", EXIT_BAD_INPUT) from None
    mine = default_home()
    try:
        relative = mine.relative_to(Path.home())
    except ValueError:  # XDG_DATA_HOME points elsewhere: theirs is the plain default
        relative = Path(".local", "share", "volunteer")
    return Path(account.pw_dir) / relative


def _pick(name: Optional[str], directory: Path) -> str:
    from volunteer.daemon.service_unit import installed_units

    if name:
        return name
    units = installed_units(directory)
    if len(units) == 1:
        return units[0]
    if not units:
        raise fail(f"no volunteer service is installed in {directory}; install one with "
                   "`volunteer service install EXPERIMENT`", EXIT_FAILED)
    raise fail(f"several volunteer services are installed ({', '.join(units)}): pick one with --name",
               EXIT_BAD_INPUT)


@service_app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def install(
    ctx: typer.Context,
    experiment: str = typer.Argument(..., metavar="EXPERIMENT",
                                     help="Manifest path, or the name of a shipped experiment."),
    home: Optional[Path] = HOME_OPTION,
    name: Optional[str] = typer.Option(None, "--name", help=NAME_HELP),
    print_only: bool = typer.Option(False, "--print",
                                    help="Print a system-wide unit (with User=) instead of installing a user unit."),
    user: Optional[str] = typer.Option(None, "--user", help="With --print: the account the service runs as "
                                                            "(default: you); without --home, the home is the "
                                                            "default data directory in that account's home."),
    start: bool = typer.Option(True, "--start/--no-start", help="Start the service now (it is enabled either way)."),
) -> None:
    """Write a systemd user unit that runs `volunteer join EXPERIMENT` and enable it.

    Arguments after `--` go to `join` as they are, e.g. `volunteer service install demo -- --num-experts 2 --set max_upload_rate=1MB/s`. Stopping the service is a graceful leave: systemd waits the leave deadline (setting leave_timeout_s) plus the time to checkpoint and hand experts over.
    """
    from volunteer.daemon.home import resolve_home
    from volunteer.daemon.service_unit import (
        ServiceError,
        UnitSpec,
        check_user_name,
        render_unit,
        service_name,
        user_unit_dir,
    )
    from volunteer.manifest import load_manifest

    join_args = [a for a in ctx.args if a != "--"]
    if any(a == "--home" or a.startswith("--home=") for a in join_args):
        raise fail("pass --home before `--` (it is the service's home), not among the join arguments",
                   EXIT_BAD_INPUT)
    if user is not None and not print_only:
        raise fail("--user needs --print: a user unit runs as you (print a system unit for another account)",
                   EXIT_BAD_INPUT)
    try:
        if user is not None:
            check_user_name(user)
    except ServiceError as e:
        raise fail(str(e), EXIT_BAD_INPUT) from None
    exp = _experiment_arg(experiment)
    root = resolve_home(home) if home is not None or user is None else _system_home(user)
    with domain_errors():
        manifest = load_manifest(exp)  # validated now, not at the service's first start
    settings = _check_join_args(exp, join_args, root, manifest)
    try:
        spec = UnitSpec(name=name or service_name(manifest.experiment.name), experiment=exp, home=root,
                        python=sys.executable,
                        leave_timeout_s=float(settings.leave_timeout_s), join_args=tuple(join_args),
                        user=(user or getpass.getuser()) if print_only else None)
        text = render_unit(spec)
    except ServiceError as e:
        raise fail(str(e), EXIT_BAD_INPUT) from None
    if print_only:
        sys.stdout.write(text)
        print(f"# save as /etc/systemd/system/{spec.unit}, then run: sudo systemctl daemon-reload && "
              f"sudo systemctl enable --now {spec.unit}", file=sys.stderr)
        raise typer.Exit(0)
    with domain_errors():
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = _write_unit(user_unit_dir() / spec.unit, text)
    print(f"wrote {path}")
    _enable(spec.unit, start, root)


def _write_unit(path: Path, text: str) -> Path:
    from volunteer.fsutil import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode(), mode=0o644)
    return path


def _enable(unit: str, start: bool, home: Path) -> None:
    from volunteer.daemon.service_unit import run_systemctl, systemctl_error

    enable = ["enable", "--now", unit] if start else ["enable", unit]
    steps = ["systemctl --user daemon-reload", "systemctl --user " + " ".join(enable)]
    proc = run_systemctl(["daemon-reload"])
    if proc is None:
        print("systemctl was not found (a container, or another init system): where systemd runs, do\n  "
              + " && ".join(steps) + f"\nor start the node directly with `volunteer join` (home {home}).")
        raise typer.Exit(0)
    if proc.returncode == 0:
        proc = run_systemctl(enable)
    if proc.returncode != 0:
        raise fail(f"systemctl failed: {systemctl_error(proc)}; the unit is written: run "
                   f"`{' && '.join(steps)}` in a login session with a user systemd", EXIT_FAILED)
    print(f"{'enabled and started' if start else 'enabled'} {unit}; follow its log with `volunteer logs -f`"
          f" (or `journalctl --user -u {unit}`).")
    print(f"To keep it running after you log out and start it at boot: loginctl enable-linger "
          f"{shlex.quote(getpass.getuser())}")


@service_app.command()
def uninstall(
    name: Optional[str] = typer.Option(None, "--name", help=PICK_HELP),
    force: bool = typer.Option(False, "--force", help="Remove the unit file even when systemctl fails to stop "
                                                      "and disable it (then stop it yourself)."),
) -> None:
    """Stop the service (a graceful leave), disable it and remove its unit file.

    Where no user service manager is reachable (no systemctl, or "Failed to connect to bus": nothing can run under it here), the unit file is removed and the command to run where one exists is printed. When systemctl fails otherwise the unit is kept, unless --force.
    """
    from volunteer.daemon.service_unit import (
        STOP_MARGIN_S,
        manager_unreachable,
        run_systemctl,
        systemctl_error,
        user_unit_dir,
    )

    directory = user_unit_dir()
    unit = _unit_or_fail(_pick(name, directory))
    path = directory / unit
    if not path.exists():
        raise fail(f"no unit {path}; nothing to uninstall", EXIT_FAILED)
    print(f"stopping {unit} (a graceful leave: up to leave_timeout_s + {STOP_MARGIN_S:.0f}s)...", flush=True)
    proc = run_systemctl(["disable", "--now", unit])
    later = f"`systemctl --user stop {unit}; systemctl --user daemon-reload`"
    if proc is None:
        _remove(path)
        print(f"removed {path} (systemctl was not found: nothing to stop here; where systemd manages this "
              f"account, run {later})")
        raise typer.Exit(0)
    if proc.returncode != 0:
        error = systemctl_error(proc)
        if manager_unreachable(proc):
            _remove(path)
            print(f"removed {path}; no user service manager is reachable here ({error}), so nothing ran "
                  f"under it to stop. If this account has one elsewhere (a login session), run {later} there.")
            raise typer.Exit(0)
        if not force:
            raise fail(f"systemctl failed: {error}; the unit {path} is kept: run `systemctl --user disable "
                       f"--now {unit}`, then this again (or remove the unit anyway with --force)", EXIT_FAILED)
        _remove(path)
        print(f"removed {path} although systemctl failed ({error}); the service may still run: stop it with {later}")
        raise typer.Exit(0)
    path.unlink()
    run_systemctl(["daemon-reload"])
    print(f"stopped, disabled and removed {unit}")


def _remove(path: Path) -> None:
    """Remove the unit file and what ``systemctl enable`` linked to it (``*.wants/<unit>`` in
    the same directory): what ``disable`` would have done, done by hand."""
    for link in path.parent.glob(f"*.wants/{path.name}"):
        if link.is_symlink():
            link.unlink()
    path.unlink()


def _unit_or_fail(name: str) -> str:
    from volunteer.daemon.service_unit import ServiceError, unit_file_name

    try:
        return unit_file_name(name)
    except ServiceError as e:
        raise fail(str(e), EXIT_BAD_INPUT) from None


@service_app.command()
def status(
    name: Optional[str] = typer.Option(None, "--name", help=PICK_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the state as JSON."),
) -> None:
    """Show whether the service is installed, enabled and running (systemctl's state).

    Exits 0 when it runs, 3 when it is installed but not running, 1 when it is not installed.
    """
    from volunteer.daemon.service_unit import run_systemctl, systemctl_error, user_unit_dir

    directory = user_unit_dir()
    unit = _unit_or_fail(_pick(name, directory))
    path = directory / unit
    report: dict[str, Any] = {"unit": unit, "path": str(path), "installed": path.exists(),
                              "systemctl": None, "active": None, "enabled": None}
    if report["installed"]:
        proc = run_systemctl(["show", unit, "--property=ActiveState,SubState,UnitFileState,MainPID"])
        if proc is not None:
            if proc.returncode == 0:
                props = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
                report["systemctl"] = props
                report["active"] = props.get("ActiveState") == "active"
                report["enabled"] = props.get("UnitFileState") == "enabled"
            else:
                report["systemctl"] = {"error": systemctl_error(proc)}
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2, sort_keys=True) + "\n")
    else:
        print(_status_line(report))
    if not report["installed"]:
        raise typer.Exit(EXIT_FAILED)
    raise typer.Exit(0 if report["active"] else EXIT_NOT_RUNNING)


def _status_line(report: dict[str, Any]) -> str:
    unit, path = report["unit"], report["path"]
    if not report["installed"]:
        return f"{unit}: not installed (no {path}); install it with `volunteer service install EXPERIMENT`"
    props = report["systemctl"]
    if props is None:
        return f"{unit}: installed at {path}; systemctl was not found, so its state is unknown here"
    if "error" in props:
        return f"{unit}: installed at {path}; systemctl failed: {props['error']}"
    state = f"{props.get('ActiveState', '?')} ({props.get('SubState', '?')})"
    pid = props.get("MainPID", "0")
    return (f"{unit}: {state}, {props.get('UnitFileState', '?')}" + (f", pid {pid}" if pid not in ("", "0") else "")
            + f"; unit {path}")
