"""Serving runtime: ZeroMQ frontend, task pools per (expert, op), batching scheduler,
device executor, activation cache and per-expert statistics. Other frontends (the libp2p
bridge) submit requests through ``Runtime.submit``, the in-process entry point.

Files:

- ``limits.py``: ``ServingLimits`` (batch, queue, message and activation-cache bounds).
- ``task_pool.py``: ``Task`` and ``TaskPool`` (FIFO per (uid, op)).
- ``validation.py``: request -> ``Task`` (arity, shapes, batch size), typed errors.
- ``activation_cache.py``: ``ActivationCache`` of forward graphs for backward without recompute.
- ``executor.py``: ``BatchExecutor`` (forward/backward of one batch, CPU and CUDA).
- ``stats.py``: ``ExpertStats`` (counts, rates, batch histogram, latency percentiles, errors).
- ``loop.py``: ``ServingLoop``, the one thread that does socket IO and compute (no hand-offs).
- ``runtime.py``: ``Runtime`` (submit, batching scheduler, drain/stop, ``exclusive()``, stats).
- ``zmq_frontend.py``: ``ZmqFrontend`` (ROUTER socket on TCP, port 0 allowed).
"""
