"""Wire protocol shared by clients and servers: msgpack header + one raw frame per tensor.

Files (see each module docstring): protocol version and ops, header encode/decode with hard
limits, tensor <-> frame conversion (float32/float16/bfloat16, optional fp16 compression),
typed error codes and exceptions, the ``Transport`` protocol clients call through, and
length-prefixed framing for byte streams (libp2p).
"""
