"""The volunteer daemon: supervisor lifecycle, settings, hardware detection, control API,
health snapshot, drain and leave.

Files:

- ``supervisor.py``: ``Supervisor``, one node's lifecycle (start, ready, serve, leave),
  including when the peer network starts, announces, drains and stops;
  ``node_network.py``: joining (caps and the "paused" announce wrapper included) and stopping
  the network; ``node_id.py``: the node's peer id from its home identity.
- ``control_ops.py``: the control API's operations (status, ping, leave, checkpoint, pause,
  resume).
- ``pause.py``: ``PauseController`` (``volunteer pause``/``resume``, the resource rules and the
  daily transfer cap, applied to the runtime's gate and the records); ``rules.py``: the pure
  rule engine (schedule per weekday, battery, idle, other programs' CPU);
  ``rule_sources.py``: what the machine reports (idle time, battery, CPU) and the named test
  seam.
- ``contribution.py``: ``ContributionLedger``, lifetime totals per experiment in
  ``<home>/contribution.json``; ``receipt.py``: those totals signed by the node's key
  (``make_receipt``/``verify_receipt``).
- ``transfer_quota.py``: ``TransferQuota``, the daily transfer cap kept in
  ``<home>/transfer.json``; ``metrics.py``: ``MetricsServer``, the optional Prometheus
  endpoint over the snapshot; ``service_unit.py``: the systemd unit and systemctl calls.
- ``network.py``: the daemon's side of the peer network: ``--bootstrap``/``--new-swarm``
  applied to the manifest, ``start_network`` (one-line ``NetworkStartError``), the load the
  DHT records carry, and the "why" line when the network is unwell.
- ``settings.py``: the one table of local settings and their layering
  (defaults < ``<home>/config.yaml`` < ``VOLUNTEER_*`` env < flags).
- ``home.py``: ``NodeHome`` (layout, 0700 dirs, flock'ed single-daemon lock, atomic
  ``control.json``) and ``resolve_home``.
- ``hardware.py``: GPU/CPU/RAM detection, device choice, live usage figures.
- ``control_protocol.py`` / ``control_server.py`` / ``control_client.py``: the local control
  API (length-prefixed JSON over an owner-only Unix socket) used by ``status`` and ``leave``.
- ``checkpointer.py``: restore hosted experts from checkpoints; consistent periodic/final
  checkpoint passes under ``Runtime.exclusive()``.
- ``snapshot.py``: the status snapshot (schema in its docstring); ``health.py``: the
  level and one-line "why" (pure rules); ``leave_report.py``: what a leave did.
- ``logs.py``: stderr + rotating file logging and the compact live line on a TTY;
  ``ready_log.py``: the lines logged once the node is ready.
- ``shards.py``: ``ShardManager``: which experts to host (from the swarm's view), where their
  weights come from (download, checkpoint, deterministic init), rebalancing, adoption.
- ``handouts.py``: ``Handouts``: the shards this node hands out (snapshots, pins).
- ``handoff.py``: ``hand_off``: on leave, every expert no one else serves goes to an adopter.
- ``replicas.py``: ``ReplicaSync``: elastic averaging between the holders of each hosted uid
  (the trainers' ``Averager`` over a ``SwarmGroup`` on the node's averaging channel).
- ``swarm_view.py``: ``SwarmView``: the DHT's holders of the grid in the shapes the
  decisions need (pure); ``capacity.py``: how many experts fit (num_experts, grid, memory).
"""
