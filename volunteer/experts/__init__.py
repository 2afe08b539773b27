"""Experts: the explicit zoo, backends (module + optimizer + update counter), checkpoints,
assignment and the cached throughput self-benchmark.

Files:

- ``zoo.py``: expert modules: ``ffn`` (FeedForwardExpert), ``transformer``, ``nop``.
- ``registry.py``: ``build_expert(kind, hidden_dim, **options)``, ``available_experts()``; plug-in
  kinds from installed packages' ``volunteer.experts`` entry points (never a module a manifest
  names), and ``require_expert_kind`` naming the package a node lacks.
- ``backend.py``: ``OptimizerSpec`` and ``ExpertBackend`` (forward, cached-graph backward,
  optimizer step, ``updates_applied``, state dicts).
- ``checkpoint.py``, ``selfbench.py``: see their docstrings.
- ``assignment.py``: which uids to host from the swarm's view, and who adopts on leave (pure).
- ``shard.py``: the shard format (bounded header + raw tensors, sha256 per chunk, root hash);
  ``shard_cache.py``: complete shards to serve and resumable partial downloads on disk.
"""
