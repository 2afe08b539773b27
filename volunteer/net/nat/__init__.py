"""NAT traversal: reachability by dial-back over a fresh connection, Circuit Relay v2
(hop on public nodes, reservations on private ones) and DCUtR hole punching.
"""
