"""``volunteer join EXPERIMENT``: run a volunteer node in the foreground until it leaves."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any, Optional

import typer

from volunteer.cli.console import EXIT_FAILED, EXIT_FORCED, EXIT_OK, domain_errors
from volunteer.daemon.settings import BY_NAME

log = logging.getLogger("volunteer.cli.join")
PUBLIC_CHOICES = ("yes", "no", "auto")
MAX_SETTING_CHARS = 256  # what a string setting holds (volunteer.daemon.settings)


def shipped_experiments() -> list[str]:
    """Names of the manifests shipped in ``volunteer.configs`` (what ``load_manifest``
    resolves a bare name to), read without importing the manifest package: the help
    text is built whenever the CLI starts."""
    from importlib import resources

    try:
        return sorted(p.name[:-5] for p in resources.files("volunteer.configs").iterdir()
                      if p.name.endswith(".yaml") and not p.name.startswith("example-"))
    except (ModuleNotFoundError, OSError):
        return []


def _default(name: str) -> str:
    """A setting's default as ``--help`` shows it (the flag itself defaults to "unset")."""
    value = BY_NAME[name].default
    return str(value).lower() if isinstance(value, bool) else str(value)


_SHIPPED = ", ".join(shipped_experiments()) or "none"


def join(
    experiment: str = typer.Argument(..., metavar="EXPERIMENT",
                                     help=f"A shipped manifest ({_SHIPPED}) or the path of a manifest file."),
    home: Optional[Path] = typer.Option(None, "--home", envvar="VOLUNTEER_HOME", show_envvar=True,
                                        show_default="the user data directory, e.g. ~/.local/share/volunteer",
                                        help="Node home (identity, config, checkpoints, logs, control socket)."),
    device: Optional[str] = typer.Option(None, "--device", show_default=_default("device"),
                                         help="auto, cpu, cuda, cuda:N, cuda:0,cuda:1 or mps (setting: device)."),
    num_experts: Optional[int] = typer.Option(None, "--num-experts", show_default=_default("num_experts"),
                                              help="How many experts of the grid to host (setting: num_experts)."),
    host: Optional[str] = typer.Option(None, "--host", show_default=_default("zmq_host"),
                                       help="ZeroMQ bind address; 0.0.0.0 serves other machines (setting: zmq_host)."),
    port: Optional[int] = typer.Option(None, "--port", show_default=_default("zmq_port"),
                                       help="ZeroMQ port, 0 = any (setting: zmq_port)."),
    bootstrap: list[str] = typer.Option([], "--bootstrap", metavar="MULTIADDR", show_default="the manifest's",
                                        help="A peer of the swarm to join through (/ip4/../tcp/../p2p/ID), added "
                                             "to the manifest's network.bootstrap; repeatable."),
    new_swarm: bool = typer.Option(False, "--new-swarm",
                                   help="Start a new swarm (ignore the manifest's bootstrap peers); prints the "
                                        "addresses other volunteers pass as --bootstrap."),
    listen_host: Optional[str] = typer.Option(None, "--listen-host", show_default=_default("listen_host"),
                                              help="libp2p listen address (setting: listen_host; 127.0.0.1 for a "
                                                   "swarm on one machine)."),
    listen_port: Optional[int] = typer.Option(None, "--listen-port", metavar="PORT",
                                              show_default="auto: the manifest's, else the last run's",
                                              help="libp2p TCP port to open or forward (setting: listen_port); "
                                                   "0 = any free port, new at each start."),
    announce: list[str] = typer.Option([], "--announce", metavar="MULTIADDR", show_default="the manifest's",
                                       help="Address to announce instead of the detected ones, e.g. "
                                            "/ip4/203.0.113.5/tcp/4001 for a forwarded port (setting: "
                                            "announce_addrs); repeatable."),
    public: Optional[str] = typer.Option(None, "--public", metavar="yes|no|auto",
                                         show_default="auto: the manifest's",
                                         help="Serve the DHT and relay for others from the start (yes: a public "
                                              "node), never (no), or as the manifest says (setting: public)."),
    set_: list[str] = typer.Option([], "--set", metavar="NAME=VALUE",
                                   help="Any setting (see `volunteer settings`); repeatable."),
) -> None:
    """Join an experiment: host experts on this machine until `volunteer leave` or Ctrl-C.

    Detects the hardware, validates the manifest, joins the experiment's peer network (DHT), chooses which experts to host from what the swarm already serves (unserved ones first, then those below the manifest's replication target), downloads their newest weights from the volunteers that hold them (or resumes this home's checkpoints, or starts fresh experts from the experiment's seed), announces each once loaded, serves trainers, and prints where they reach this node (ZeroMQ endpoint, peer id, multiaddrs). A manifest without bootstrap peers (or --new-swarm) starts a new swarm. Logs go to stderr and to <home>/logs/volunteer.log. SIGTERM/SIGINT leave gracefully (in-flight work finishes, and each expert no other volunteer serves is handed to one that takes it over); a second one forces.

    Settings: flags > VOLUNTEER_* environment > <home>/config.yaml > defaults (`volunteer settings` lists them all). The network settings listen_port, announce_addrs and public are per machine: left at auto they take the manifest's network section; the libp2p port is kept in the home, so the --bootstrap address printed at the first start stays valid after a restart.
    """
    with domain_errors():
        code = _join(experiment, home, set_, bootstrap, new_swarm,
                     **flag_settings(device=device, num_experts=num_experts, host=host, port=port,
                                     listen_host=listen_host, listen_port=listen_port, announce=announce,
                                     public=public))
    raise typer.Exit(code)


def flag_settings(*, device: Optional[str], num_experts: Optional[int], host: Optional[str],
                  port: Optional[int], listen_host: Optional[str], listen_port: Optional[int],
                  announce: list[str], public: Optional[str]) -> dict[str, Any]:
    """``join``'s dedicated flags as setting names and values (None: not given), checked; the
    one mapping ``join`` and ``volunteer service install`` (which checks join arguments) use."""
    return {"device": device, "num_experts": num_experts, "zmq_host": host, "zmq_port": port,
            "listen_host": listen_host, "listen_port": listen_port,
            "announce_addrs": _announce_flag(announce), "public": _public_flag(public)}


def _announce_flag(values: list[str]) -> str | None:
    """``--announce`` values as the ``announce_addrs`` setting (comma-separated), or None."""
    from volunteer.daemon.settings import SettingsError

    text = ",".join(v.strip() for v in values)
    if len(text) > MAX_SETTING_CHARS:
        raise SettingsError(f"--announce: at most {MAX_SETTING_CHARS} characters in all, got {len(text)}: "
                            "announce fewer addresses (one per forwarded port is enough)")
    return text or None


def _public_flag(value: str | None) -> str | None:
    from volunteer.daemon.settings import SettingsError

    if value is not None and value.strip().lower() not in PUBLIC_CHOICES:
        raise SettingsError(f"--public {value!r}: expected one of {', '.join(PUBLIC_CHOICES)}")
    return value


class _Signals:
    """First SIGINT/SIGTERM: graceful leave. Second: exit at once (code 130)."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.supervisor: Any = None

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def attach(self, supervisor: Any) -> None:
        self.supervisor = supervisor
        if self.received:
            supervisor.request_leave(None, self.received[0])

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received:
            log.error("second %s: forcing exit now; in-flight work and unsaved updates are lost", name)
            logging.shutdown()
            os._exit(EXIT_FORCED)
        self.received.append(name)
        log.warning("%s received: leaving gracefully (send it again to force)", name)
        if self.supervisor is not None:
            self.supervisor.request_leave(None, name)


def _join(experiment: str, home: Optional[Path], set_: list[str], bootstrap: list[str], new_swarm: bool,
          **flags: Any) -> int:
    import dataclasses

    from volunteer.daemon.home import NodeHome, resolve_home
    from volunteer.daemon.logs import close_logging, setup_logging
    from volunteer.daemon.network import NetworkStartError, effective_network
    from volunteer.daemon.settings import SettingsError, parse_assignments, resolve_settings
    from volunteer.manifest import load_manifest

    node = NodeHome(resolve_home(home))
    given = {name: value for name, value in flags.items() if value is not None}
    settings = resolve_settings(node.config_file, os.environ, {**parse_assignments(set_), **given})
    manifest = load_manifest(experiment)  # the cheap checks first: torch is not imported yet
    if (bootstrap or new_swarm) and not settings.network_enabled:
        raise SettingsError("--bootstrap/--new-swarm need the peer network, but network_enabled is false")
    network = effective_network(manifest.network, bootstrap, new_swarm, settings, manifest.source)
    manifest = dataclasses.replace(manifest, network=network)
    node.create()
    node.acquire_lock()
    node.remove_control_file()  # a killed daemon's stale address: not ready until we publish ours
    signals = _Signals()
    signals.install()
    sup = None
    try:
        live = setup_logging(settings.log_level, node.log_file, live=sys.stderr.isatty())
        held = _held_port(settings, network)  # in a second, before torch and the experts load
        if held:
            log.error("cannot start: %s", held)
            return EXIT_FAILED
        sup = _build_supervisor(node, manifest, settings, live)
        signals.attach(sup)
        try:
            sup.start()
            report = sup.run()
        except (OSError, NetworkStartError) as exc:  # e.g. a port is taken: the message says what to change
            log.error("cannot start: %s", exc)
            return EXIT_FAILED
        except Exception:
            log.exception("the daemon failed")
            return EXIT_FAILED
        return EXIT_OK if report.clean else EXIT_FAILED
    finally:
        if sup is not None:
            sup.close()
        node.release_lock()
        close_logging()


def _held_port(settings: Any, network: Any) -> str | None:
    """One line when the ZeroMQ or the fixed libp2p port is already taken, else None.

    Probed before the slow part of the start (torch, experts), so a held port is reported at
    once; the listens themselves check again (another program may take the port meanwhile).
    A libp2p port left to any free port (0, or the one kept from the last run, which moves
    when taken) is not probed here."""
    from volunteer.net.listen_error import held_port_line, port_holder_error

    if int(settings.zmq_port):
        err = port_holder_error(settings.zmq_host, int(settings.zmq_port))
        if err is not None:
            return held_port_line(err, "ZeroMQ", "--port")
    if settings.network_enabled and network.listen_port:
        host = settings.listen_host or os.environ.get("VOLUNTEER_LISTEN_HOST", "").strip() or "0.0.0.0"
        err = port_holder_error(host, int(network.listen_port))
        if err is not None:
            return held_port_line(err, "libp2p", "--listen-port", network.listen_port_origin)
    return None


def _build_supervisor(node: Any, manifest: Any, settings: Any, live: Any) -> Any:
    """Check what needs torch (expert kind/options, device), then build the supervisor."""
    from volunteer.daemon.footprint import keep_dynamo_unloaded

    log.debug("footprint: %d torch.optim wrappers kept from importing torch._dynamo", keep_dynamo_unloaded())
    from volunteer.daemon.hardware import choose_devices, configure_device, detect_hardware
    from volunteer.daemon.supervisor import Supervisor
    from volunteer.experts.registry import build_expert, require_expert_kind
    from volunteer.manifest import ManifestError

    require_expert_kind(manifest.expert.kind, manifest.expert.package, manifest.source)
    try:
        build_expert(manifest.expert.kind, manifest.expert.hidden_dim, **manifest.expert.options)
    except ValueError as exc:
        raise ManifestError(manifest.source, "expert", str(exc)) from None
    hardware = detect_hardware()
    devices = choose_devices(settings.device, hardware)
    for device in devices:
        configure_device(device, settings.max_gpu_memory_fraction)
    return Supervisor(node, manifest, settings, hardware, devices, live=live)
