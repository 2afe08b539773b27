"""Peer network (trio + py-libp2p): host and identity, bootstrap, Kademlia DHT expert
registry with signed records, expert RPC over reused libp2p streams, and the bridge to the
runtime. NAT traversal lives in ``volunteer.net.nat``.

Files (one concept each):

- ``host.py``: TCP + Noise + yamux host construction (set explicitly), the persistent
  Ed25519 identity (``<home>/identity.key``, 0600), multiaddr helpers, log quieting.
- ``node.py``: ``SwarmNode``: host + KadDHT + bootstrap with retry/backoff that re-runs
  by itself when the node has lost every peer; DHT server/client switch at run time.
- ``records.py``: signed registry entries (``ServerEntry``), DHT keys, merge rules (pure).
- ``dht_store.py``: ``RegistryDHT`` (validator, merging value store, no trainers in the
  routing table) and ``publish_value`` / ``lookup_value``.
- ``dht_routing.py``: bounded iterative FIND_NODE over live DHT servers, cached per key.
- ``dht_rpc.py``: FIND_NODE / GET_VALUE / PUT_VALUE on reused, bounded DHT streams.
- ``registry.py``: ``ExpertRegistry``: announce uids (prefix index), children, servers.
- ``stream_io.py``: expert-RPC message envelope (call id + ``volunteer.wire.framing``).
- ``rpc_server.py``: ``RpcServer``: expert RPC streams -> the runtime's ``submit``.
- ``rpc_client.py``: ``RpcClient`` (per-peer stream pools that leave relayed connections
  once a direct one exists) and ``Libp2pTransport``.
- ``trio_thread.py``: ``TrioThread``: a trio loop in a thread with a sync facade.
- ``service.py``: ``NetworkService``: the daemon's facade (announce, heartbeat, drain,
  snapshot), running ``SwarmNode`` + ``RpcServer`` + ``NatTraversal``; serves the DHT
  only when reachable, announces relay-only addresses when private.
- ``client_node.py``: ``ClientNode``: the trainer's peer (DHT client, no experts) that
  reaches NATed volunteers by itself (relay circuits + DCUtR via ``NatTraversal``).
- ``dht_directory.py``: ``DhtDirectory``: the client ``ExpertDirectory`` over the DHT.
- ``dialing.py``: ``dial``: reach a peer by its record's addresses (direct, else relayed).
- ``shard_rpc.py``: the shard protocol (header, chunk, adopt): ``ShardServer``, ``ShardClient``.
- ``shard_download.py``: ``download_shard``: one shard from every holder at once, verified
  chunk by chunk, resumable; ``DownloadProgress``.
- ``shard_network.py``: ``ShardNetwork``: the daemon's sync API for holders, downloads
  (libp2p, or ZeroMQ from public holders) and hand-off offers.
"""
