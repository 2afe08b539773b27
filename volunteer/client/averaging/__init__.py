"""Decentralized averaging: many trainers (or replicas of one expert) keep one model.

The Elastic Gossip thesis's methods (``local``, ``noComm``, ``gradAllReduce``,
``elasticGossip``, ``gossipingSgd``), one implementation used by trainers
(``CollaborativeOptimizer``) and by volunteers for the replicas of one expert
(``volunteer.daemon.replicas``).

Files:

- ``group.py``: ``AveragingGroup`` (who the peers are, ``exchange`` with one of them),
  ``Exchange``, ``ExchangeHandler``, ``PeerChannel``: the one primitive every method is
  built from, and the one interface both hosts carry its bytes through.
- ``methods.py``: the thesis's methods (``METHODS``, ``AveragingConfig``) and their in-place
  arithmetic (``elastic_pull_``, ``average_into_``, ``mean_``, ``divergence``).
- ``averager.py``: ``Averager``, one worker's side of a method over a group: all-reduce of
  gradients, elastic/gossip exchanges, the validating handler, the bounded gradient buffer,
  peers' updates applied between steps (``apply_pending``), stats.
- ``optimizer.py``: ``CollaborativeOptimizer``, the trainer API wrapped around a torch optimizer.
- ``consensus.py``: ``finish``, the end of a run: agree on one copy with the members still
  in it (midpoint pulls until a quiet sweep, bounded).
- ``local_group.py``: ``LocalHub`` / ``LocalGroup``, a group inside one process (threads), for
  tests and the thesis-table experiment.
- ``wire.py``: averaging messages on ``/volunteer/averaging/1.0.0`` (exchange request,
  answer, typed refusal; bounded before allocation, optional fp16).
- ``swarm_group.py``: ``ExchangeServer`` (one per host, handlers in a bounded worker pool)
  and ``SwarmGroup`` (the ``AveragingGroup`` over a ``PeerChannel``).
- ``membership.py``: ``DhtMembership``: members as signed DHT entries under
  ``_avg.<run_id>.``, read through the experiment's admission filter.
"""
