"""Broken manifests and the one-line error each must produce (shared by the loader tests and
the CLI tests). Each case: id, manifest text, expected key path ("" = whole file), and a
fragment the message must contain."""

from __future__ import annotations

import copy

import yaml

VALID = {
    "experiment": {"name": "test-exp", "version": "1"},
    "expert": {"kind": "ffn", "hidden_dim": 16},
    "grid": {"prefix": "test.ffn", "dims": [2, 2]},
    "optimizer": {"name": "adam", "lr": 0.001},
    "serving": {"max_batch_size": 64},
    "network": {"bootstrap": [], "relays": [], "listen_port": 0, "announce_addrs": [], "public": "auto"},
}
PEER = "QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN"


def mutate(path: str, value: object, delete: bool = False) -> str:
    doc = copy.deepcopy(VALID)
    keys = path.split(".")
    node = doc
    for k in keys[:-1]:
        node = node[k]
    if delete:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return yaml.safe_dump(doc)


CASES: list[tuple[str, str, str, str]] = [
    ("not-yaml", "experiment: [unclosed\n", "", "invalid YAML: line"),
    ("empty", "", "", "empty manifest"),
    ("top-level-list", "- a\n- b\n", "(top level)", "expected a mapping"),
    ("unknown-top-key", mutate("trainer", {"x": 1}), "trainer", "unknown key"),
    ("missing-experiment", mutate("experiment", None, delete=True), "experiment", "missing required key"),
    ("bad-name", mutate("experiment.name", "Bad Name!"), "experiment.name", "lowercase name"),
    ("missing-version", mutate("experiment.version", None, delete=True), "experiment.version", "missing required key"),
    ("hidden-dim-negative", mutate("expert.hidden_dim", -3), "expert.hidden_dim", "an integer in [1, 65536]"),
    ("hidden-dim-string", mutate("expert.hidden_dim", "big"), "expert.hidden_dim", "the string 'big'"),
    ("unknown-expert-key", mutate("expert.activation", "relu"), "expert.activation", "unknown key"),
    ("bad-option-value", mutate("expert.options", {"expansion": [1, 2]}), "expert.options.expansion",
     "expected a number, boolean or short string"),
    ("grid-prefix-digit", mutate("grid.prefix", "demo.3"), "grid.prefix", "dot-separated names"),
    ("grid-dims-zero", mutate("grid.dims", [4, 0]), "grid.dims", "positive integers"),
    ("grid-too-large", mutate("grid.dims", [4096, 4096]), "grid.dims", "at most 1048576 experts"),
    ("optimizer-unknown", mutate("optimizer.name", "lion"), "optimizer.name", "one of adam, sgd"),
    ("lr-zero", mutate("optimizer.lr", 0), "optimizer.lr", "a number in (0, 10]"),
    ("batch-size-bool", mutate("serving.max_batch_size", True), "serving.max_batch_size", "an integer in"),
    ("serving-typo", mutate("serving.max_batch", 8), "serving.max_batch", "unknown key"),
    ("bootstrap-not-multiaddr", mutate("network.bootstrap", ["1.2.3.4:4001"]), "network.bootstrap[0]",
     "expected a multiaddr"),
    ("relay-without-peer-id", mutate("network.relays", ["/ip4/1.2.3.4/tcp/4001"]), "network.relays[0]",
     "/p2p/<peer id>"),
    ("listen-port-range", mutate("network.listen_port", 70000), "network.listen_port", "an integer in [0, 65535]"),
    ("public-choice", mutate("network.public", "maybe"), "network.public", "one of auto, yes, no"),
    ("network-unknown", mutate("network.ports", [1]), "network.ports", "unknown key"),
    ("seed-negative", mutate("experiment.seed", -1), "experiment.seed", "an integer in [0, "),
    ("replication-zero", mutate("shards", {"replication": 0}), "shards.replication", "an integer in [1, 64]"),
    ("chunk-too-small", mutate("shards", {"chunk_bytes": 1024}), "shards.chunk_bytes", "an integer in [65536,"),
    ("rebalance-zero", mutate("shards", {"rebalance_interval_s": 0}), "shards.rebalance_interval_s",
     "a number in [1, 86400]"),
    ("shards-typo", mutate("shards", {"replicas": 2}), "shards.replicas", "unknown key"),
    ("admission-bad-owner", mutate("admission", {"owner": "rsa:abc"}), "admission.owner", "ed25519:"),
    ("admission-bad-peer", mutate("admission", {"peers": ["not-a-peer"]}), "admission.peers[0]", "peer id"),
]
VALID_BOOTSTRAP = f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}"
