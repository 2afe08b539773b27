"""Bytes of the DHT messages the upkeep sends, built with the real encoders.

``message_bytes()`` encodes, with py-libp2p's protobuf ``Message`` and the product's record
code, what a volunteer's upkeep puts on the wire: a FIND_NODE request for a registry key; its
reply with ``BUCKET_SIZE`` closer peers, each with two addresses and the signed peer record
(envelope) that py-libp2p attaches when it holds one, plus the answerer's own record; and a
PUT_VALUE of one registry entry (a volunteer serving one uid of a row: one child, two
addresses, one shard info), signed as ``dht_store.publish_value`` signs it. Stream framing
(varint, yamux, Noise: tens of bytes per message) and TCP/IP headers are not counted.
"""

from __future__ import annotations

import time

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.kad_dht.common import BUCKET_SIZE
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.peer.envelope import seal_record
from libp2p.peer.id import ID
from libp2p.peer.peer_record import PeerRecord
from libp2p.records.record import make_signed_put_record
from multiaddr import Multiaddr

from volunteer.net import records
from volunteer.net.record_fields import ServerEntry, ShardInfo

_ADDRS = ("/ip4/203.0.113.7/tcp/4001", "/ip4/198.51.100.23/udp/4001/quic-v1")


def message_bytes() -> dict[str, int]:
    """Encoded sizes (bytes) of the upkeep's messages (see module docstring)."""
    keys = [create_new_key_pair() for _ in range(BUCKET_SIZE + 1)]
    ids = [ID.from_pubkey(k.public_key) for k in keys]
    addrs = [Multiaddr(a) for a in _ADDRS]
    envelopes = [seal_record(PeerRecord(pid, addrs), k.private_key).marshal_envelope()
                 for pid, k in zip(ids, keys, strict=True)]
    key = records.dht_key("experiment", "ffn.12.").encode()

    request = Message(type=Message.MessageType.FIND_NODE, key=key)
    reply = Message(type=Message.MessageType.FIND_NODE, senderRecord=envelopes[0])
    for pid, env in zip(ids[1:], envelopes[1:], strict=True):
        peer = reply.closerPeers.add()
        peer.id = pid.to_bytes()
        peer.addrs.extend(a.to_bytes() for a in addrs)
        peer.signedRecord = env

    entry = ServerEntry(
        experiment="experiment", prefix="ffn.12.", peer_id=ids[0].to_base58(),
        seq=time.time_ns(), expires=time.time() + 60.0, children=("34",), state="serving",
        load=0.5, addrs=tuple(f"{a}/p2p/{ids[0].to_base58()}" for a in _ADDRS),
        reachability="private", shards=(ShardInfo("34", 120, bytes(32)),), free=1)
    value = records.encode_value([records.sign_entry(entry, keys[0].private_key)])
    put = Message(type=Message.MessageType.PUT_VALUE, key=key)
    put.record.CopyFrom(make_signed_put_record(key, value, keys[0].private_key))
    return {
        "find_node_request": request.ByteSize(),
        "find_node_reply": reply.ByteSize(),
        "put_value": put.ByteSize(),
        "registry_entry": len(value),
    }
