"""Serving runtime: ZeroMQ frontend, task pools per (expert, op), batching scheduler,
device executor and per-expert statistics. Other frontends (the libp2p bridge) submit
requests through the runtime's in-process entry point.
"""
