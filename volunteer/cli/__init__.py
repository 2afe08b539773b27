"""Command-line interface (typer): one module per command; no business logic here.

Files:

- ``app.py``: the typer application, command registration and ``main``.
- ``console.py``: the one place for output (stdout/stderr consoles, ``NO_COLOR``, plain
  when not a TTY), exit codes, and domain errors turned into one-line messages.
- ``join.py``: ``volunteer join EXPERIMENT`` (runs the daemon in the foreground).
- ``status.py``: ``volunteer status`` (live dashboard, ``--once``, ``--json``, plain text).
- ``leave.py``: ``volunteer leave`` (graceful drain + checkpoint through the control API).
- ``info.py``: ``volunteer info`` (hardware and device choice, ``--json``).
- ``settings_cmd.py``: ``volunteer settings`` (every setting, its value and where it came from).
- ``pause.py``: ``volunteer pause [--for]`` / ``volunteer resume``.
- ``receipt.py``: ``volunteer receipt`` (signed lifetime contribution, ``--verify``).
- ``service.py``: ``volunteer service install|uninstall|status`` (a systemd unit).
- ``logs.py``: ``volunteer logs [-f] [-n N]``.
- ``doctor.py``: ``volunteer doctor`` (preflight: a verdict and a fix per line, ``--json``).
- ``swarm.py``: ``volunteer swarm`` (the swarm as the DHT shows it, ``--json``).
- ``manifest_cmd.py``: ``volunteer manifest schema|check|example`` (the researcher's reference).
- ``admission.py``: ``volunteer admission`` (owner keys and tokens of closed experiments).
"""
