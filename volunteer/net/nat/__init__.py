"""NAT traversal: reachability by dial-back over a fresh connection, Circuit Relay v2
(hop on public nodes, reservations on private ones) and DCUtR hole punching.

Files:

- ``traversal.py``: ``NatTraversal(host, relays, allow_hop, ...)``, the trio service that
  NetworkService runs (``await nursery.start(nat.run)``): reachability check, relay
  (hop or reservations), hole punching, ``snapshot()``, ``connect(addrs)``.
- ``reachability.py``: the ``/volunteer/dialback/1.0.0`` protocol (``DialbackServer``,
  ``ask_dialback``), ``decide`` (public / private / unknown) and ``explain`` (the message
  that tells a user why the node cannot be reached and what to change).
- ``relay.py``: ``RelayNode`` (Circuit Relay v2 HOP/STOP/CLIENT roles over
  ``libp2p.relay.circuit_v2``), ``RelaySettings`` (limits), ``circuit_addr``.
- ``holepunch.py``: ``HolePuncher`` (DCUtR service, ``upgrade(peer_id)``).
- ``connections.py``: connection kinds (direct / relayed / hole_punched) and the
  ``ConnectionLedger`` notifee that remembers which connections a hole punch opened.

Proven on real NATs (network namespaces + iptables MASQUERADE) in ``tests/netlab``.
"""
