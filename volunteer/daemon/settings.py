"""Local node settings, layered: defaults < ``<home>/config.yaml`` < ``VOLUNTEER_*`` env < flags.

``SETTINGS`` is the one table of every setting (name, type, default, environment variable,
help); the config file, the environment, ``--set NAME=VALUE`` and ``volunteer settings`` all
derive from it. Values are validated with the same rules whatever layer they come from, and
a bad value is a ``SettingsError`` naming the layer and the setting. Beyond type and range, a
row may carry a ``check`` (the one definition of a rule that lives elsewhere: the schedule's
format from ``daemon.rules``, the multiaddrs from the manifest's validator), so
``volunteer settings`` rejects what ``join`` would, before anything loads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

MAX_CONFIG_BYTES = 64 * 1024
ENV_PREFIX = "VOLUNTEER_"
LOG_LEVELS = ("debug", "info", "warning", "error")
AUTO = "auto"


class SettingsError(Exception):
    """A setting with a bad name or value; ``str(err)`` is a one-line message."""


@dataclass(frozen=True)
class Setting:
    """One row of the settings table."""

    name: str
    type: type
    default: Any
    help: str
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] | None = None
    auto: bool = False  # also accepts the word "auto" (resolved by whoever applies the setting)
    # a further rule on the converted value (never called with "auto"): check(value, where)
    # raises SettingsError naming ``where`` and this setting
    check: Callable[[Any, str], None] | None = None

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    def coerce(self, value: Any, where: str) -> Any:
        """Validate ``value`` (a YAML scalar or a string from env/flags) for this setting."""
        try:
            out = self._convert(value)
        except (TypeError, ValueError):
            raise SettingsError(f"{where}: {self.name}: expected {self._expected()}, got {value!r}") from None
        if self.choices is not None and out not in self.choices:
            raise SettingsError(f"{where}: {self.name}: expected {self._expected()}, got {value!r}")
        numeric = isinstance(out, (int, float)) and not isinstance(out, bool)
        if numeric and ((self.lo is not None and out < self.lo) or (self.hi is not None and out > self.hi)):
            raise SettingsError(f"{where}: {self.name}: expected {self._expected()}, got {value!r}")
        if self.check is not None and out != AUTO:
            self.check(out, where)
        return out

    def _convert(self, value: Any) -> Any:
        if self.auto and isinstance(value, str) and value.strip().lower() == AUTO:
            return AUTO
        if self.type is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if self.type is int:
            if isinstance(value, (bool, float)):
                raise TypeError(value)
            return int(str(value).strip(), 10)
        if self.type is float:
            if isinstance(value, bool):
                raise TypeError(value)
            out = float(str(value).strip())
            if not math.isfinite(out):
                raise ValueError(value)
            return out
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise TypeError(value)
        text = str(value).strip()
        if len(text) > 256:
            raise ValueError(value)
        return text

    def _expected(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        if self.type is bool:
            return "one of yes, no, auto" if self.auto else "true or false"
        name = {int: "an integer", float: "a number", str: "a string"}[self.type]
        if self.lo is not None and self.hi is not None:
            name = f"{name} in [{self.lo:g}, {self.hi:g}]"
        return f"{AUTO} or {name}" if self.auto else name


class ByteSetting(Setting):
    """A byte count or rate: an integer or a human size (``1.5MB/s``, ``500k``, ``2MiB``), read
    by ``volunteer.net.rate_limit.parse_bytes`` (the one parser of sizes)."""

    def _convert(self, value: Any) -> Any:
        from volunteer.net.rate_limit import parse_bytes

        return parse_bytes(value)

    def _expected(self) -> str:
        from volunteer.net.rate_limit import format_bytes

        text = "a size in bytes such as 1500000, 500k, 1.5MB or 2MiB"
        if self.lo is not None and self.hi is not None and self.lo > 0:
            return f"{text}, from {format_bytes(self.lo)} to {format_bytes(self.hi)}"
        return f"{text} (0 = unlimited)"


def _check_schedule(value: Any, where: str) -> None:
    """The ``schedule`` setting parses (``daemon.rules``: the one definition of the format)."""
    from volunteer.daemon.rules import schedule_problem

    problem = schedule_problem(str(value))
    if problem is not None:
        raise SettingsError(f"{where}: schedule: {problem}")


def _check_announce(value: Any, where: str) -> None:
    """Every address of ``announce_addrs`` is a multiaddr (``daemon.network.announce_setting``:
    the manifest's ``multiaddr_problem``, the same count limit)."""
    from volunteer.daemon.network import announce_setting

    announce_setting(str(value), where)


SETTINGS: tuple[Setting, ...] = (
    Setting("device", str, "auto", "compute devices: auto (every GPU, experts placed across them; "
            "else CPU), cpu, cuda, cuda:N, a list cuda:0,cuda:1 or mps"),
    Setting("num_experts", int, 4, "how many experts of the experiment's grid this node hosts", 1, 4096),
    Setting("zmq_host", str, "127.0.0.1", "address the ZeroMQ frontend binds (use 0.0.0.0 to serve other machines)"),
    Setting("zmq_port", int, 0, "ZeroMQ frontend port (0 = any free port)", 0, 65535),
    Setting("advertise_host", str, "", "host name trainers should dial, when different from zmq_host"),
    Setting("network_enabled", bool, True, "join the peer network (DHT); false serves over ZeroMQ only (offline runs)"),
    Setting("listen_host", str, "0.0.0.0", "address the libp2p host listens on (127.0.0.1 for a swarm on one machine)"),
    Setting("listen_port", int, AUTO, "libp2p TCP port (open or forward it to serve as a public node); auto = the "
            "manifest's network.listen_port, and where that is 0 the port this home used last (kept in "
            "<home>/network.json, so the --bootstrap address others copied stays valid); 0 = any free port, "
            "new at each start", 0, 65535, auto=True),
    Setting("announce_addrs", str, AUTO, "comma-separated multiaddrs to announce instead of the detected ones "
            "(e.g. /ip4/203.0.113.5/tcp/4001 for a forwarded port); auto = the manifest's "
            "network.announce_addrs; empty = the detected addresses", auto=True, check=_check_announce),
    Setting("public", bool, AUTO, "serve the DHT and relay for others: yes (a public node), no (never), auto = "
            "the manifest's network.public (whose own auto decides by a dial-back check)", auto=True),
    Setting("checkpoint_interval_s", float, 300.0, "seconds between periodic checkpoints (a kill -9 loses at most this much)", 1, 86400),
    Setting("leave_timeout_s", float, 30.0, "default deadline for a graceful leave (SIGTERM/SIGINT)", 0.1, 3600),
    Setting("log_level", str, "info", "log level for stderr and the log file", choices=LOG_LEVELS),
    Setting("torch_threads", int, AUTO, "torch intra-op threads; auto = on a CPU node, the count that ran the "
            "expert's serving step fastest in the self-benchmark (the fewest within 5%, cached per device and "
            "expert); without it (selfbench=false, GPU) logical CPUs - 1, at least 1", 1, 1024, auto=True),
    Setting("max_gpu_memory_fraction", float, 0.9, "largest share of the GPU's memory this node may use", 0.05, 1.0),
    ByteSetting("shard_cache_bytes", int, 4 * 2**30, "disk cap of the expert shard cache (downloads and the shards this "
            "node hands out; units allowed: 4GB, 500MiB); least recently used shards go first", 64 * 2**20, 2**50),
    Setting("selfbench", bool, True, "measure expert throughput on first join (cached per device and expert)"),
    # resource rules (volunteer.daemon.rules): when they apply the node pauses (experts stay loaded)
    Setting("schedule", str, "", 'when this node may work, in local time, e.g. "mon-fri 18:00-08:00, sat-sun '
            'all day" (days mon..sun, ranges, daily; HH:MM-HH:MM or "all day"); empty = any time',
            check=_check_schedule),
    Setting("pause_on_battery", bool, True, "pause while the machine runs on battery (no battery: never)"),
    Setting("idle_minutes", float, 0.0, "run only after this many minutes without user input (terminals, input "
            "devices, X11 via xprintidle; where none is readable the rule cannot tell and never pauses); "
            "0 = off", 0, 1440),
    Setting("other_cpu_limit_pct", float, 0.0, "pause while other programs use more than this % of the "
            "machine's CPU (all cores = 100); 0 = off", 0, 100),
    ByteSetting("max_upload_rate", int, 0, "upload cap on expert and shard traffic, all peers together, in "
                "bytes/s (units allowed: 500k, 1.5MB/s, 2MiB/s); 0 = unlimited", 0, 2**40),
    ByteSetting("max_download_rate", int, 0, "download cap on expert and shard traffic, all peers together, in "
                "bytes/s (units allowed: 500k, 1.5MB/s, 2MiB/s); 0 = unlimited", 0, 2**40),
    ByteSetting("daily_transfer_cap", int, 0, "bytes in + out per UTC day on expert and shard traffic (e.g. 5GB); "
                "once reached the node takes no new work until 00:00 UTC; 0 = unlimited", 0, 2**50),
    Setting("metrics_enabled", bool, False, "serve Prometheus metrics (the status figures) over HTTP at "
            "metrics_host:metrics_port/metrics"),
    Setting("metrics_host", str, "127.0.0.1", "address the Prometheus endpoint binds (loopback by default; "
            "0.0.0.0 exposes it to the network)"),
    Setting("metrics_port", int, 9477, "port of the Prometheus endpoint (0 = any free port, logged)", 0, 65535),
)
BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


class Settings:
    """Resolved settings: attribute access by name, plus where each value came from."""

    def __init__(self, values: Mapping[str, Any], sources: Mapping[str, str]) -> None:
        self._values = dict(values)
        self._sources = dict(sources)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def source(self, name: str) -> str:
        return self._sources[name]

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def describe(self) -> list[dict[str, Any]]:
        """Rows for ``volunteer settings``: name, value, source, env var, help."""
        return [
            {"name": s.name, "value": self._values[s.name], "source": self._sources[s.name],
             "env": s.env, "default": s.default, "help": s.help}
            for s in SETTINGS
        ]


def parse_assignments(pairs: list[str]) -> dict[str, str]:
    """Parse ``--set NAME=VALUE`` flags; unknown names are a ``SettingsError``."""
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name = name.strip().replace("-", "_")
        if not sep:
            raise SettingsError(f"--set {pair!r}: expected NAME=VALUE")
        if name not in BY_NAME:
            raise SettingsError(f"--set {pair!r}: unknown setting {name!r} (known: {', '.join(BY_NAME)})")
        out[name] = value
    return out


def read_config_file(path: Path) -> dict[str, Any]:
    """Read ``<home>/config.yaml`` (a flat mapping of setting names); missing file -> {}."""
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise SettingsError(f"{path}: file larger than {MAX_CONFIG_BYTES} bytes")
    try:
        doc = yaml.safe_load(data.decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{path}: invalid YAML: {str(exc).splitlines()[0]}") from exc
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise SettingsError(f"{path}: expected a mapping of setting names to values")
    for key in doc:
        if key not in BY_NAME:
            raise SettingsError(f"{path}: {key}: unknown setting (known: {', '.join(BY_NAME)})")
    return doc


def resolve_settings(
    config_file: Path | None, env: Mapping[str, str], flags: Mapping[str, Any]
) -> Settings:
    """Layer defaults < config file < environment < flags, validating every layer."""
    values = {s.name: s.default for s in SETTINGS}
    sources = {s.name: "default" for s in SETTINGS}
    if config_file is not None:
        for name, value in read_config_file(config_file).items():
            values[name] = BY_NAME[name].coerce(value, str(config_file))
            sources[name] = "config"
    for s in SETTINGS:
        if s.env in env:
            values[s.name] = s.coerce(env[s.env], f"environment {s.env}")
            sources[s.name] = "env"
    for name, value in flags.items():
        if value is None:
            continue
        if name not in BY_NAME:
            raise SettingsError(f"unknown setting {name!r}")
        values[name] = BY_NAME[name].coerce(value, "command line")
        sources[name] = "flag"
    return Settings(values, sources)
