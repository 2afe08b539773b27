"""Peer network (trio + py-libp2p): host and identity, bootstrap, Kademlia DHT expert
registry with signed records, expert RPC over reused libp2p streams, and the bridge to the
runtime. NAT traversal lives in ``volunteer.net.nat``.
"""
