"""Wire protocol shared by clients and servers: msgpack header + one raw frame per tensor.

Files:

- ``errors.py``: ``RemoteError`` and its typed subclasses (fixed codes), ``error_from_code``.
- ``limits.py``: ``WireLimits`` (header bytes, tensors, elements, bytes), checked before allocating.
- ``tensors.py``: tensor <-> frame (float32/float16/bfloat16, optional fp16 compression, zero-copy).
- ``messages.py``: protocol version, request/reply encode/decode with validation.
- ``ops.py``: the ``info`` op (which experts a server hosts).
- ``framing.py``: length-prefixed frame lists for byte streams (libp2p).
- ``transport.py``: the ``Transport`` protocol clients call through.
- ``zmtp.py``: ``ZmtpConnection``, ZeroMQ's wire protocol (ZMTP 3.0, NULL security) spoken
  from the calling thread to a ROUTER; bounded, deadline-checked reads.

No pickle anywhere: headers are msgpack, tensors are raw little-endian buffers.
"""
