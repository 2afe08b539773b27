"""Diagnosis: ``volunteer doctor`` (can this machine serve?) and ``volunteer swarm`` (what the
DHT shows of the experiment). Plain functions returning data; the CLI modules print it.

Files:

- ``report.py``: ``Check`` (name, verdict ok/warn/fail/skip, detail, fix), ``Report``
  (``can_serve``, ``as_json``), ``render_text`` (width-aware lines, the fix never cut).
- ``local.py``: Python / torch / CUDA and the device (``check_software``), the home
  (``check_home``: writable, owned, private, identity key), free disk (``check_disk``).
- ``ports.py``: ``check_port`` over the network layer's probe bind
  (``net.listen_error.port_holder_error``: no SO_REUSEPORT, the holder's pid).
- ``bootstrap.py``: ``probe`` (``net.dialing.probe_bootstraps``: TCP, then the libp2p
  handshake; "connection refused at HOST:PORT", "wrong peer id") and ``check_bootstrap``
  (each address and where it came from).
- ``network.py``: ``probe_network(ProbePlan)``: a libp2p peer of the doctor's own (dial-back
  reachability, relay reservation, grid records, hole punch), each step under a deadline.
- ``network_checks.py``: the verdicts of the probe; ``clock.py``: clock skew from the signed
  record timestamps (pure).
- ``runner.py``: ``run_doctor`` (all checks in order -> ``Report``).
- ``census.py``: ``read_grid`` (every parent prefix of a grid, one bounded lookup each).
- ``swarm_summary.py``: ``summarise`` (volunteers, reachability mix, replicas, unserved uids;
  pure); ``swarm_client.py``: ``read_swarm`` (a throwaway ``ClientNode`` reads the census).
"""
