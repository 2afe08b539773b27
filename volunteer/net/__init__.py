"""Peer network (trio + py-libp2p): host and identity, bootstrap, Kademlia DHT expert
registry with signed records, expert RPC over reused libp2p streams, and the bridge to the
runtime. NAT traversal lives in ``volunteer.net.nat``. The trainer's side (``ClientNode``,
``DhtDirectory``, server choice) lives in ``volunteer.client``, which imports this package;
this package never imports ``volunteer.client``.

Files (one concept each):

- ``config.py``: ``NetworkConfig``: what ``NetworkService`` needs to join the network
  (manifest ``network`` section + local choices), frozen and validated.
- ``libp2p_adapter.py``: every reach into py-libp2p internals (connections, DHT routing
  table and value store, DCUtR, relay, yamux fast-path reads, writes and window credit),
  each raising ``Libp2pInternalsError`` when gone;
  ``side_state``: our state for py-libp2p objects in a weak side table.
- ``host.py``: TCP + Noise + yamux host construction (set explicitly), the persistent
  Ed25519 identity (``identity.key`` in the folder given: ``<home>/identity/`` for a node, 0600), multiaddr helpers, log quieting.
- ``listen_error.py``: ``ListenError``: why the host could not listen (probe bind);
  ``port_holder_error`` / ``shared_port_error`` name the process holding a port (SO_REUSEPORT
  sharers included).
- ``rate_limit.py``: ``TokenBucket`` and ``Traffic`` (bandwidth caps + byte meter for expert and
  shard traffic), ``parse_bytes`` / ``format_bytes``.
- ``node.py``: ``SwarmNode``: host + KadDHT + bootstrap with retry/backoff that re-runs
  by itself when the node has lost every peer; DHT server/client switch at run time.
- ``records.py``: signed registry entries (``ServerEntry``), DHT keys, merge rules (pure).
- ``record_fields.py``: ``ServerEntry``'s fields and their bounds; hostile entries dropped
  (by reason) before anything uses them.
- ``admission.py``: closed experiments: owner keys, admission tokens, the readers' policy.
- ``dht_store.py``: ``RegistryDHT`` (validator, merging value store, no trainers in the
  routing table) and ``publish_value`` / ``lookup_value``.
- ``dht_routing.py``: iterative FIND_NODE over live DHT servers (``run_lookup``: bounded in
  rounds, time and candidates), cached per key.
- ``dht_rpc.py``: FIND_NODE / GET_VALUE / PUT_VALUE on reused, bounded DHT streams;
  ``run_lookup``.
- ``dht_guard.py``: ``install_dht_guard``: per-peer limits in front of py-libp2p's inbound
  Kademlia handler.
- ``registry.py``: ``ExpertRegistry``: announce uids (prefix index), children, servers.
- ``stream_io.py``: expert-RPC message envelope (call id + ``volunteer.wire.framing``),
  nowait reads of buffered messages, and the yamux fast path (one frame per small message,
  window credit in batches).
- ``peer_limits.py``: ``PeerLimits`` / ``PeerLimiter``: rate and concurrent requests per
  remote peer, and the read deadlines of its streams.
- ``byte_budget.py``: ``ByteBudget``: bytes a server holds for requests in flight, shared
  by all its streams and peers.
- ``rpc_server.py``: ``RpcServer``: expert RPC streams -> the runtime's ``submit``, bounded
  in bytes (``ByteBudget``), per peer (``PeerLimits``) and in time.
- ``rpc_calls.py``: ``Pending`` (one call awaiting its reply) and ``Channel`` (a pooled stream
  with its calls in flight).
- ``rpc_client.py``: ``RpcClient`` (per-peer stream pools that leave relayed connections
  once a direct one exists; replies bounded in size and time) and ``Libp2pTransport``.
- ``protocol_channel.py``: ``ProtocolChannel``: one more request/reply protocol on the node's
  host (the averaging channel), with the expert RPC's bounds and the sender's peer id taken
  from the connection.
- ``trio_thread.py``: ``TrioThread``: a trio loop in a thread with a sync facade.
- ``service.py``: ``NetworkService``: the daemon's facade (announce, heartbeat, drain,
  snapshot), running ``SwarmNode`` + ``RpcServer`` + ``NatTraversal``; serves the DHT
  only when reachable, announces relay-only addresses when private.
- ``service_snapshot.py``: the service's status snapshot (JSON-serialisable, loop-owned
  state read in the network thread).
- ``dialing.py``: ``dial``: reach a peer by its record's addresses (direct, else relayed); why
  a dial failed in plain words (``describe_dial_error``) and ``probe_bootstrap`` (a throwaway
  host's dial, for the daemon's start and ``volunteer doctor``).
- ``shard_rpc.py``: the shard protocol (header, chunk, adopt): ``ShardServer``, ``ShardClient``.
- ``shard_download.py``: ``download_shard``: one shard from every holder at once, verified
  chunk by chunk, resumable; ``DownloadProgress``.
- ``shard_network.py``: ``ShardNetwork``: the daemon's sync API for holders, downloads
  (libp2p, or ZeroMQ from public holders) and hand-off offers; the shard server's budget
  and per-peer limits.
"""
