"""Experiment manifests shipped with volunteer (installed as ``volunteer.configs``).

- ``demo.yaml``: a local experiment that needs no outside peer (starts its own swarm).
- ``scale.yaml``: the larger grid the scale benchmarks use.
- ``example-lm.yaml``: a fully commented template for a realistic experiment (an MoE layer of a
  language model); shown by ``volunteer manifest example lm``, never offered by ``join``.
"""
