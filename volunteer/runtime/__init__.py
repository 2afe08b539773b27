"""Serving runtime: ZeroMQ frontend, task pools per (expert, op), batching scheduler,
device executor, activation cache and per-expert statistics. Other frontends (the libp2p
bridge) submit requests through ``Runtime.submit``, the in-process entry point.

Files:

- ``limits.py``: ``ServingLimits``, the one definition of every serving limit (the manifest's
  ``serving`` section, ``max_grad_norm`` included; the wire limits derive from it).
- ``task_pool.py``: ``Task`` and ``TaskPool`` (FIFO per (uid, op)).
- ``validation.py``: request -> ``Task`` (arity, shapes, batch size), typed errors.
- ``activation_cache.py``: ``ActivationCache`` of forward graphs for backward without recompute.
- ``executor.py``: ``BatchExecutor`` (forward/backward of one batch, CPU and CUDA; 16-bit
  wires cast on the device).
- ``transfers.py``: host <-> device moves of a batch (gather, pinned copies back, per-task
  slices in each client's dtype).
- ``completer.py``: ``Completer``, the thread that finishes GPU batches (waits for the
  batch's CUDA event, builds and sends the replies) while the loop launches the next one.
- ``pinned.py``: pinned host memory for a GPU node's received frames (``frame_alloc_for``).
- ``stats.py``: ``ExpertStats`` (counts, rates, batch histogram, latency percentiles, errors,
  bytes in and out).
- ``loop.py``: ``ServingLoop``, an epoll loop thread (one computes, one does the ZMTP IO).
- ``pause_gate.py``: ``PauseGate``: while the volunteer pauses, new work gets the typed
  "paused" reply (admitted work finishes).
- ``request_budget.py``: ``RequestBudget``, ``max_queued_bytes`` with its typed refusals.
- ``runtime.py``: ``Runtime`` (submit, batching scheduler, drain/stop, ``exclusive()``, stats).
- ``zmq_frontend.py``: ``ZmqFrontend``, the ZeroMQ ROUTER endpoint on TCP (port 0 allowed),
  served by our own ZMTP server on an IO thread of its own.
- ``zmtp_server.py``: ``ZmtpServer`` (accept, epoll IO, every buffered byte reserved against
  ``max_queued_bytes``, caps on frames, connections and unsent replies, deadlines).
- ``zmtp_shaping.py``: ``ZmtpShaping``, the bandwidth caps of ZMTP connections (reads/writes
  held back by loop timers, never a sleep).
- ``zmtp_conn.py``: one connection's ZMTP 3.0 parsing (greeting, READY, frames), bounds
  checked at each frame header before anything is allocated.
"""
