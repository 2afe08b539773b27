"""volunteer: lend a GPU or CPU to train one large neural network with strangers.

Subpackages (imports flow one way: manifest/wire -> net, experts -> runtime -> daemon -> cli;
``client`` needs only ``net`` + ``wire``; ``status`` needs only the snapshot it renders):

- ``manifest``: the YAML experiment manifest (schema, loading, errors with key paths).
- ``wire``: message schema and tensor framing shared by clients and servers (no pickle).
- ``experts``: expert zoo, backends (module + optimizer), checkpoints, self-benchmark.
- ``runtime``: ZeroMQ frontends, task pools, batching scheduler, device execution, stats.
- ``net``: libp2p host and identity, DHT expert registry, reachability, relay/hole punching.
- ``client``: RemoteExpert, RemoteMixtureOfExperts, beam search over the expert grid.
- ``daemon``: supervisor, control API, settings, hardware detection, drain/leave.
- ``status``: the ``volunteer status`` dashboard rendered from a daemon snapshot.
- ``cli``: the typer application; one module per command, no business logic.
- ``fsutil``: crash-safe atomic file writes (temp file, fsync, rename) used by daemon and experts.
"""

__version__ = "0.1.0"
