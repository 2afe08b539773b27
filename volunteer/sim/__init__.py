"""Swarm simulator (issue 13): thousands of volunteers in one process, on a virtual clock.

The product's own DHT code (py-libp2p's ``RoutingTable``, ``dht_routing.table_lookup`` and
``dht_rpc.run_lookup``) runs over a simulated transport, so hours of swarm time at 10,000
peers take minutes. Used by ``scripts/simulate_swarm.py``; never imported by the daemon or
the client.

- ``clock.py``: ``run_virtual`` (trio + ``MockClock``), order-independent seeded draws.
- ``transport.py``: ``LinkModel`` (RTT, loss, NAT, relays), ``SimNetwork`` (peers,
  FIND_NODE answered from the peer's own routing table, the product's lookup over it).
- ``churn.py``: ``ChurnModel`` (replacements per hour, kills without goodbye).
- ``upkeep.py``: DHT requests per volunteer / per server per minute from the product's
  upkeep constants (heartbeat, ``REPLICATION``, ``CHECK_ASK``, ``CLOSEST_FRESH_S``, ...).
- ``wire_sizes.py``: bytes of those messages, built with the real encoders.
- ``dht_swarm.py``: ``SwarmSpec``, ``measure_dht``: build a swarm, measure hops, latency,
  success and recall with and without churn.
- ``sim_registry.py``: the product's record code (signing, validation, capped merge, prefix
  index) over in-memory DHT keys.
- ``grid_scale.py``: ``measure_grid``: thousands of volunteers serving one grid
  (discoverability under capped keys, old vs sharded layout), with ``beam_cost.py`` (beam
  search per trainer step) and ``coverage.py`` (assignment: cover, re-cover after a mass
  leave, moves).
- ``relays.py``: ``relay_plan``: relays needed for the wild NAT mix and what each carries.
"""
