"""Experts: the explicit zoo, backends (module + optimizer + update counter), checkpoints,
assignment and the cached throughput self-benchmark.

Files:

- ``zoo.py``: expert modules: ``ffn`` (FeedForwardExpert), ``transformer``, ``nop``.
- ``registry.py``: ``build_expert(kind, hidden_dim, **options)``, ``available_experts()``.
- ``backend.py``: ``OptimizerSpec`` and ``ExpertBackend`` (forward, cached-graph backward,
  optimizer step, ``updates_applied``, state dicts).
- ``checkpoint.py``, ``selfbench.py``, ``assignment.py``: see their docstrings.
"""
