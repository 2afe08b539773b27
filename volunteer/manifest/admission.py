"""The manifest's optional ``admission`` section: who may take part in a closed experiment.

An open experiment (no ``admission`` section, the default) admits every peer. A closed one
names an experiment *owner key* and/or a list of peer ids::

    admission:
      owner: "ed25519:3b6a27bc..."     # 64 hex digits; `volunteer admission keygen` prints it
      peers: [12D3KooW..., 12D3KooW...] # admitted without a token (optional)

Peers holding an admission token signed by the owner key (``volunteer.net.admission``), and
the listed peers, may announce experts and join averaging groups; records from anyone else
are ignored by every reader.

This module is pure (no libp2p, no torch), so a broken section is reported as fast as the rest
of the manifest: the owner key text is checked to be a valid Ed25519 point and each peer id to
be a canonical base58 multihash, the same checks the network layer applies.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import base58
from nacl.bindings import crypto_core_ed25519_is_valid_point

from volunteer.manifest.errors import ManifestError, describe

KEY_SCHEME = "ed25519:"
PUBLIC_KEY_BYTES = 32
MAX_LISTED_PEERS = 1024
MAX_PEER_ID_CHARS = 128
_HEX_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_BASE58_RE = re.compile(r"^[1-9A-HJ-NP-Za-km-z]+$")
_IDENTITY_MULTIHASH = 0x00
_SHA256_MULTIHASH = 0x12
_MAX_INLINE_KEY_BYTES = 42  # libp2p inlines keys up to 42 bytes (Ed25519 peer ids)
_ALLOWED_KEYS = ("owner", "peers")


class OwnerKeyFormatError(ValueError):
    """Text that is not ``ed25519:<64 hex digits>`` of a valid Ed25519 public key."""


@dataclass(frozen=True)
class AdmissionSpec:
    """The validated ``admission`` section; both fields empty means an open experiment."""

    owner: str | None = None
    peers: tuple[str, ...] = ()

    @property
    def open(self) -> bool:
        """True when every peer is admitted (no owner key and no listed peers)."""
        return self.owner is None and not self.peers


OPEN = AdmissionSpec()


def format_owner_key(public_key: bytes) -> str:
    """The manifest text of a raw 32-byte Ed25519 public key: ``ed25519:<64 hex digits>``."""
    if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_BYTES:
        raise OwnerKeyFormatError(f"an Ed25519 public key is {PUBLIC_KEY_BYTES} bytes")
    return KEY_SCHEME + public_key.hex()


def parse_owner_key(text: object) -> bytes:
    """The raw public key of ``ed25519:<64 lowercase hex digits>``; OwnerKeyFormatError if not.

    Rejects points that are not on the curve (or of small order), so a manifest can never
    name a key under which forged tokens would verify.
    """
    if not isinstance(text, str) or not text.startswith(KEY_SCHEME):
        raise OwnerKeyFormatError(f"expected {KEY_SCHEME}<64 hex digits>, got {describe(text)}")
    digits = text[len(KEY_SCHEME):]
    if not _HEX_KEY_RE.match(digits):
        raise OwnerKeyFormatError(
            f"expected {KEY_SCHEME} followed by 64 lowercase hex digits, got {describe(text)}"
        )
    raw = bytes.fromhex(digits)
    if not crypto_core_ed25519_is_valid_point(raw):
        raise OwnerKeyFormatError(f"{text[:24]}... is not a valid Ed25519 public key")
    return raw


def peer_id_problem(value: object) -> str | None:
    """None when ``value`` is a canonical base58 libp2p peer id, else what is wrong with it.

    A peer id is the base58 text of a multihash: sha256 (``Qm...``) or an inlined key
    (``12D3KooW...`` for Ed25519). Canonical means it re-encodes to the same text, so two
    spellings of one peer can never both be listed or compared unequal.
    """
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_PEER_ID_CHARS:
        return f"expected a peer id such as 12D3KooW..., got {describe(value)}"
    if not _BASE58_RE.match(value):
        return f"expected a base58 peer id such as 12D3KooW..., got {describe(value)}"
    raw = base58.b58decode(value)
    if base58.b58encode(raw).decode() != value or len(raw) < 2:
        return f"expected a canonical base58 peer id, got {describe(value)}"
    code, length, digest = raw[0], raw[1], raw[2:]
    ok = len(digest) == length and (
        (code == _SHA256_MULTIHASH and length == 32)
        or (code == _IDENTITY_MULTIHASH and 1 <= length <= _MAX_INLINE_KEY_BYTES)
    )
    if not ok:
        return f"expected a libp2p peer id (a sha256 or identity multihash), got {describe(value)}"
    return None


def parse_admission(raw: object, file: str = "manifest") -> AdmissionSpec:
    """Validate the manifest's ``admission`` section (``None`` when absent: open experiment).

    Raises ``ManifestError`` naming ``admission.<field>`` and the fix, in one line.
    """
    if raw is None:
        return OPEN
    if not isinstance(raw, Mapping):
        raise ManifestError(file, "admission", f"expected a mapping with owner and/or peers, got {describe(raw)}")
    for key in raw:
        if not isinstance(key, str) or key not in _ALLOWED_KEYS:
            raise ManifestError(file, f"admission.{key}",
                                f"unknown key (expected one of: {', '.join(_ALLOWED_KEYS)})")
    owner = raw.get("owner")
    if owner is not None:
        try:
            parse_owner_key(owner)
        except OwnerKeyFormatError as exc:
            raise ManifestError(file, "admission.owner",
                                f"{exc}; paste the line `volunteer admission keygen` printed") from None
    peers = raw.get("peers")
    if peers is None:
        peers = []
    if not isinstance(peers, list) or len(peers) > MAX_LISTED_PEERS:
        raise ManifestError(file, "admission.peers",
                            f"expected a list of at most {MAX_LISTED_PEERS} peer ids, got {describe(peers)}")
    seen: set[str] = set()
    for i, peer in enumerate(peers):
        problem = peer_id_problem(peer)
        if problem:
            raise ManifestError(file, f"admission.peers[{i}]",
                                f"{problem} (`volunteer admission show` prints a node's peer id)")
        if peer in seen:
            raise ManifestError(file, f"admission.peers[{i}]", f"peer id {peer} is listed twice")
        seen.add(peer)
    if owner is None and not peers:
        raise ManifestError(file, "admission",
                            "expected an owner key and/or a list of peers; remove the section for an "
                            "open experiment")
    return AdmissionSpec(owner=owner, peers=tuple(peers))
