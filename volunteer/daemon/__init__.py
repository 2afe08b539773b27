"""The volunteer daemon: supervisor lifecycle, settings, hardware detection, control API,
health snapshot, drain and leave.

Files:

- ``supervisor.py``: ``Supervisor``, one node's lifecycle (start, ready, serve, leave),
  including when the peer network starts, announces, drains and stops.
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
