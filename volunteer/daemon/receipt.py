"""Contribution receipts: a node's lifetime totals for one experiment, signed by its key.

``make_receipt(home, experiment)`` reads the totals the home keeps
(``volunteer.daemon.contribution``; no daemon needed) and signs them with the node's
libp2p identity (``NodeHome.identity_dir``: ``<home>/identity/identity.key``, Ed25519: the key behind its peer id, the one its
DHT records are signed with), so an experiment can tally what each volunteer gave and
know which peer claims it. The document is JSON::

    {"format": "volunteer-receipt/1",
     "payload": "<canonical JSON: {kind, peer_id, node_id, experiment, samples, updates,
                 uptime_s, bytes_served, since, issued_at}>",
     "signature": "<base64 Ed25519 signature over DOMAIN + payload bytes>"}

The payload travels as the exact string that was signed, so a verifier in any language
checks those bytes without re-serialising anything. ``verify_receipt(doc)`` checks the
format, the signature against the key inside the payload's peer id, and every field's type
and bounds; it returns the payload's fields or raises ``ReceiptError`` (one line).

What a signature proves is who claims the numbers, not that they are true: the counts are
the volunteer's own. An experiment weighs them against what its trainers saw (e.g. the
server scores it measured of that peer), as BOINC validates credit by redundancy.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
from pathlib import Path
from typing import Any

from volunteer.daemon.contribution import load_totals

FORMAT = "volunteer-receipt/1"
KIND = "contribution"
DOMAIN = b"volunteer/contribution-receipt/v1\x00"
MAX_RECEIPT_BYTES = 16 * 1024
NUMBER_FIELDS = ("samples", "updates", "uptime_s", "bytes_served", "since", "issued_at")
STRING_FIELDS = ("kind", "peer_id", "node_id", "experiment")
MAX_COUNT = 2**63


class ReceiptError(Exception):
    """A receipt that cannot be made or does not verify; ``str(err)`` is one line."""


def canonical(payload: dict[str, Any]) -> str:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def make_receipt(home: Path, experiment: str | None = None, now: float | None = None) -> dict[str, Any]:
    """Sign the home's totals for ``experiment`` (default: the last one it served).

    Raises ``ContributionError`` without totals, ``IdentityError`` for a bad identity file.
    """
    from volunteer.daemon.home import NodeHome
    from volunteer.net.host import load_or_create_identity, peer_id_of

    home = Path(home)
    totals = load_totals(home, experiment)
    keys = load_or_create_identity(NodeHome(home).identity_dir)  # the key the node's network uses
    node_id = ""
    try:
        node_id = (home / "node_id").read_text(encoding="ascii", errors="replace").strip()[:64]
    except OSError:
        pass
    payload = {"kind": KIND, "peer_id": peer_id_of(keys).to_base58(), "node_id": node_id if node_id.isalnum() else "",
               **totals, "issued_at": round(time.time() if now is None else now, 3)}
    text = canonical(payload)
    signature = keys.private_key.sign(DOMAIN + text.encode())
    return {"format": FORMAT, "payload": text, "signature": base64.b64encode(signature).decode("ascii")}


def verify_receipt(doc: Any) -> dict[str, Any]:
    """The verified payload of a receipt (a dict, or its JSON text/bytes); ``ReceiptError``
    when it is malformed, out of bounds or not signed by the key of its peer id."""
    from libp2p.peer.id import ID

    if isinstance(doc, (bytes, str)):
        if len(doc) > MAX_RECEIPT_BYTES:
            raise ReceiptError(f"receipt larger than {MAX_RECEIPT_BYTES} bytes")
        try:
            doc = json.loads(doc)
        except (ValueError, RecursionError) as exc:
            raise ReceiptError(f"receipt is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ReceiptError(f"not a {FORMAT} receipt")
    text, sig = doc.get("payload"), doc.get("signature")
    if not isinstance(text, str) or not isinstance(sig, str) or len(text) > MAX_RECEIPT_BYTES:
        raise ReceiptError("receipt needs a payload string and a signature string")
    try:
        signature = base64.b64decode(sig, validate=True)
        payload = json.loads(text)
    except (binascii.Error, ValueError, RecursionError):
        raise ReceiptError("receipt payload or signature is malformed") from None
    _check_fields(payload)
    try:
        pid = ID.from_base58(payload["peer_id"])
        key = pid.extract_public_key()
    except Exception:
        key = None
    if key is None:
        raise ReceiptError(f"peer id {payload.get('peer_id')!r} does not carry a public key")
    try:
        ok = ID.from_pubkey(key) == pid and key.verify(DOMAIN + text.encode(), signature)
    except Exception:
        ok = False
    if not ok:
        raise ReceiptError(f"bad signature: this receipt was not signed by {payload['peer_id']} "
                           "(or was changed after signing)")
    return payload


def _check_fields(payload: Any) -> None:
    if not isinstance(payload, dict):
        raise ReceiptError("receipt payload is not an object")
    for key in STRING_FIELDS:
        value = payload.get(key)
        if not isinstance(value, str) or len(value) > 256:
            raise ReceiptError(f"receipt field {key!r} must be a short string")
    if payload["kind"] != KIND:
        raise ReceiptError(f"receipt kind {payload['kind']!r} is not {KIND!r}")
    for key in NUMBER_FIELDS:
        value = payload.get(key)
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or not 0 <= value < MAX_COUNT):
            raise ReceiptError(f"receipt field {key!r} must be a non-negative number")
