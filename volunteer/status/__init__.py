"""``volunteer status`` rendering: a rich dashboard (or plain text / JSON) from a snapshot.

Files:

- ``fmt.py``: small formatters (bytes, durations, rates, percentages) shared by both views.
- ``network_view.py``: ``network_rows(snapshot)``, the labelled network section (peer id,
  addresses, reachability, relay, peers direct/relayed/hole-punched, DHT announce state).
- ``shards_view.py``: ``shard_rows(snapshot)``, the shards section (hosted uids, where their
  weights came from, replicas, downloads with bars), and the live line's download text.
- ``replicas_view.py``: ``replica_rows(snapshot)``, the replicas section (per hosted uid:
  other replicas, divergence before the last elastic pull, exchanges ok / failed).
- ``plain.py``: ``render_plain(snapshot) -> str``, stable line-oriented text for pipes/logs.
- ``dashboard.py``: ``render_dashboard(snapshot)``, a rich renderable for terminals
  (``NO_COLOR`` is honoured by rich's console).

Both views read only the snapshot dict returned by the daemon's ``status`` control op (see
``volunteer.daemon.snapshot``); missing sections render as "n/a" or "not connected", so the
dashboard works against any daemon version.
"""
