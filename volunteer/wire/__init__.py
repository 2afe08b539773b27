"""Wire protocol shared by clients and servers: msgpack header + one raw frame per tensor.

Files:

- ``errors.py``: ``RemoteError`` and its typed subclasses (fixed codes), ``error_from_code``.
- ``limits.py``: ``WireLimits`` (header bytes, tensors, elements, bytes), checked before allocating.
- ``tensors.py``: tensor <-> frame (float32/float16/bfloat16; compressions fp16, bf16 and
  int8; zero-copy for unquantised tensors).
- ``quant.py``: 8-bit blockwise quantisation (the "int8" compression) with its error bound.
- ``messages.py``: protocol version, request/reply encode/decode with validation.
- ``ops.py``: the ``info`` op (which experts a server hosts).
- ``framing.py``: length-prefixed frame lists for byte streams (libp2p).
- ``transport.py``: the ``Transport`` protocol clients call through.
- ``zmtp.py``: ``ZmtpConnection``, ZeroMQ's wire protocol (ZMTP 3.0, NULL security) spoken
  from the calling thread to a ROUTER; bounded, deadline-checked reads.

``COMPRESSIONS`` (below) is the one list of wire compressions a caller may choose; it lives
here, free of torch, so the manifest validates ``wire.compression`` without importing torch,
and ``volunteer.wire.tensors`` re-exports it.

No pickle anywhere: headers are msgpack, tensors are raw little-endian buffers.
"""

COMPRESSIONS: tuple[str | None, ...] = (None, "fp16", "bf16", "int8")
"""Wire compressions: None (as sent), "fp16" / "bf16" (float32 travels as float16 /
bfloat16), "int8" (8-bit blockwise quantisation, ``quant.py``)."""
