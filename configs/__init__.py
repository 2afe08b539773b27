"""Experiment manifests shipped with volunteer (installed as ``volunteer.configs``).

- ``demo.yaml``: a local experiment that needs no outside peer (starts its own swarm).
"""
