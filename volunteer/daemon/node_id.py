"""The node's random id, kept in ``<home>/node_id``: it seeds the offline expert choice and
names the node in its contribution receipts, stable across restarts (the libp2p peer id is
the node's network identity; this one exists without a network too)."""

from __future__ import annotations

import secrets
from pathlib import Path


def load_node_id(root: Path) -> str:
    """The id stored in ``root/node_id``; a new random one (written there) when it is absent
    or garbled."""
    path = Path(root) / "node_id"
    try:
        with path.open("rb") as fh:
            text = fh.read(64).decode("ascii", "replace").strip()
        if text.isalnum():
            return text
    except OSError:
        pass
    text = secrets.token_hex(8)
    path.write_text(text + "\n")
    return text
