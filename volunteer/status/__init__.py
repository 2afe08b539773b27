"""``volunteer status`` rendering: a rich dashboard (or plain text / JSON) from a snapshot.

Files:

- ``fmt.py``: small formatters (bytes, rates, percentages) shared by both views, and
  ``duration()``, the one format for durations users read (``45s``, ``3m 05s``, ``2h 07m``,
  ``3d 04h``; ``1.3s`` under ten seconds), used by the daemon's live line and reports too.
- ``network_view.py``: ``network_rows(snapshot)``, the labelled network section (peer id,
  address count, reachability, relay, peers direct/relayed/hole-punched, DHT announce
  state), and ``copy_addresses(snapshot)``, the multiaddrs both views print whole on lines
  of their own (never in a cell, where they would wrap or be cut).
- ``announce.py``: ``announced_where(net)``, the one rule for "experts announced in the DHT"
  (a peer connected, or a new swarm's founder), used by the ``dht`` row and the daemon's log.
- ``experts_table.py``: ``experts_table(rows, width)``, the hosted-experts table fitted to
  the terminal (drops low-value columns first, headers never cut, never stretched).
- ``pause_view.py``: ``pause_text(snapshot)``, "paused: on battery" when the node is paused.
- ``transfer_view.py``: ``transfer_text(snapshot)``, the bandwidth caps and today's transfer
  against the daily cap ("up ≤ 2.0 MB/s, down unlimited; today 1.2 GB of 5.0 GB ...").
- ``contribution_view.py``: ``contribution_lines(snapshot)``, lifetime totals per experiment.
- ``shards_view.py``: ``shard_rows(snapshot)``, the shards section (hosted uids, where their
  weights came from, replicas, downloads with bars), and the live line's download text.
- ``replicas_view.py``: ``replica_rows(snapshot)``, the replicas section (per hosted uid:
  other replicas, divergence before the last elastic pull, exchanges ok / failed).
- ``plain.py``: ``render_plain(snapshot, width=None) -> str``, stable line-oriented text for
  pipes/logs; ``plain_fit.py`` fits it to a width (wraps under the value column, leaves out
  low-value table columns, never cuts an address).
- ``dashboard.py``: ``render_dashboard(snapshot)``, a rich renderable for terminals that
  lays itself out for the width it is given (``NO_COLOR`` is honoured by rich's console),
  and ``print_dashboard(console, snapshot)``, which prints it and then the addresses.

Both views read only the snapshot dict returned by the daemon's ``status`` control op (see
``volunteer.daemon.snapshot``); missing sections render as "n/a" or "not connected", so the
dashboard works against any daemon version.
"""
