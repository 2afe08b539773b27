"""Decentralized averaging: many trainers (or replicas of one expert) keep one model.

Files:

- ``group.py``: ``AveragingGroup`` (who the peers are, ``exchange`` with one of them),
  ``Exchange``, ``ExchangeHandler``: the one primitive every method is built from.
"""
