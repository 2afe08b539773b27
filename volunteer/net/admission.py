"""Experiment admission: owner keys, admission tokens, and the policy readers apply.

A closed experiment names an *owner key* in its manifest (``admission.owner``, see
``volunteer.manifest.admission``). The owner signs an *admission token* for each peer it
admits; a peer puts its token into every record it announces, and readers drop records whose
signer holds no valid token (nor is listed in ``admission.peers``). An open experiment (no
``admission`` section) admits everyone and tokens are ignored.

- Owner key file: text, ``OWNER_KEY_HEADER`` then the 32-byte Ed25519 seed in hex; created
  0600 with ``O_EXCL`` (never world-readable, never overwritten), refused on load when
  group/others may read it. Keys are PyNaCl Ed25519 keys (what libp2p's Ed25519 keys wrap),
  so the owner's commands and the manifest checks never import libp2p.
- Token: msgpack ``[payload, signature]``; payload is msgpack ``{"v": 1, "x": experiment,
  "id": peer id, "iat": issued (unix s), "exp": expires (unix s), "o": owner public key}``;
  the signature is the owner's Ed25519 signature over ``TOKEN_DOMAIN + payload`` (the domain
  keeps a token from ever passing as a registry entry or anything else the key signs).
  Tokens come from peers, so decoding treats them as hostile: at most ``MAX_TOKEN_BYTES``,
  exact types and keys, bounded lengths, and each refusal is a typed ``AdmissionError``.
- A node keeps its own token at ``<home>/admission/<experiment>.token`` (raw bytes, 0600;
  owner key files and token storage: ``admission_files.py``).
  Tokens travel between people as one line of base64 (``encode_token_text``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import msgpack
from nacl.bindings import crypto_core_ed25519_is_valid_point
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from volunteer.manifest.admission import (
    PUBLIC_KEY_BYTES,
    AdmissionSpec,
    format_owner_key,
    parse_owner_key,
    peer_id_problem,
)
from volunteer.manifest.validate import NAME_RE

TOKEN_DOMAIN = b"volunteer/admission-token/v1\x00"
TOKEN_VERSION = 1
MAX_TOKEN_BYTES = 1024
MAX_TOKEN_TEXT_CHARS = 4 * MAX_TOKEN_BYTES // 3 + 8
MAX_VALIDITY_S = 10 * 366 * 86400
MAX_TIMESTAMP = 2**40
SIGNATURE_BYTES = 64
SEED_BYTES = 32
OWNER_KEY_HEADER = "volunteer admission owner key v1 (secret: whoever holds it admits peers)"
MAX_OWNER_KEY_FILE_BYTES = 256
ADMISSION_DIR = "admission"
TOKEN_SUFFIX = ".token"
CACHE_SIZE = 4096
_PAYLOAD_KEYS = frozenset({"v", "x", "id", "iat", "exp", "o"})


class AdmissionError(ValueError):
    """A token (or its absence) that does not admit a peer; ``str()`` is one line."""


class MalformedTokenError(AdmissionError):
    """Not a token: too large, not msgpack, wrong types or keys, out-of-range numbers."""


class ForgedTokenError(AdmissionError):
    """The signature does not verify with the owner key the token names."""


class WrongOwnerError(AdmissionError):
    """Signed by another owner key than the experiment's."""


class WrongExperimentError(AdmissionError):
    """Issued for another experiment."""


class WrongPeerError(AdmissionError):
    """Issued for another peer id than the one presenting it."""


class ExpiredTokenError(AdmissionError):
    """Past its expiry."""


class NotAdmittedError(AdmissionError):
    """No token, and the peer is not listed in the manifest."""


class OwnerKeyFileError(Exception):
    """The owner key file is missing, malformed, too permissive, or would be overwritten."""


@dataclass(frozen=True)
class AdmissionToken:
    """A decoded token whose signature verified against ``owner`` (its own claim)."""

    experiment: str
    peer_id: str
    issued_at: int
    expires: int
    owner: bytes

    @property
    def owner_text(self) -> str:
        return format_owner_key(self.owner)

    def expired(self, now: float) -> bool:
        return now > self.expires


# ---- owner keys -------------------------------------------------------------------------


def new_signing_key() -> SigningKey:
    """A fresh key whose public half is a valid point (as libp2p's Ed25519 keys are made)."""
    while True:
        key = SigningKey.generate()
        if crypto_core_ed25519_is_valid_point(bytes(key.verify_key)):
            return key


def owner_public_key(key: SigningKey) -> bytes:
    """The raw 32-byte public key of an owner key."""
    return bytes(key.verify_key)


def owner_key_text(key: SigningKey) -> str:
    """The manifest text of an owner key's public half (``ed25519:<hex>``)."""
    return format_owner_key(owner_public_key(key))


# ---- tokens -----------------------------------------------------------------------------


def check_experiment(experiment: object) -> str:
    if not isinstance(experiment, str) or not NAME_RE.match(experiment):
        raise AdmissionError(f"bad experiment name {experiment!r}: expected the manifest's "
                             "experiment.name (lowercase letters, digits, '-' or '_')")
    return experiment


def issue_token(owner_key: SigningKey, experiment: str, peer_id: str, expires: float,
                issued_at: float | None = None) -> bytes:
    """Sign a token admitting ``peer_id`` to ``experiment`` until ``expires`` (unix seconds)."""
    check_experiment(experiment)
    problem = peer_id_problem(peer_id)
    if problem:
        raise AdmissionError(f"bad peer id: {problem}")
    iat = int(time.time() if issued_at is None else issued_at)
    exp = int(expires)
    if not 0 <= iat <= exp <= MAX_TIMESTAMP or exp - iat > MAX_VALIDITY_S:
        raise AdmissionError(f"a token must expire after it is issued and within "
                             f"{MAX_VALIDITY_S // 86400} days")
    payload = msgpack.packb({"v": TOKEN_VERSION, "x": experiment, "id": peer_id, "iat": iat,
                             "exp": exp, "o": owner_public_key(owner_key)}, use_bin_type=True)
    token = msgpack.packb([payload, owner_key.sign(TOKEN_DOMAIN + payload).signature], use_bin_type=True)
    assert len(token) <= MAX_TOKEN_BYTES  # bounded by the name, peer id and key lengths
    return token


def _unpack(data: bytes, what: str) -> object:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, max_str_len=MAX_TOKEN_BYTES,
                               max_bin_len=MAX_TOKEN_BYTES, max_array_len=4, max_map_len=8,
                               max_ext_len=0)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise MalformedTokenError(f"{what} is not valid msgpack ({type(exc).__name__})") from None


def _int(obj: dict, key: str) -> int:
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TIMESTAMP:
        raise MalformedTokenError(f"token field {key!r} must be an integer in [0, {MAX_TIMESTAMP}]")
    return value


def parse_token(data: object) -> tuple[AdmissionToken, bytes, bytes]:
    """Structure only (no signature or curve check): the token, its payload, its signature."""
    if not isinstance(data, bytes) or not 0 < len(data) <= MAX_TOKEN_BYTES:
        raise MalformedTokenError(f"a token must be 1 to {MAX_TOKEN_BYTES} bytes")
    outer = _unpack(data, "token")
    if (not isinstance(outer, list) or len(outer) != 2
            or not all(isinstance(x, bytes) for x in outer)):
        raise MalformedTokenError("a token must be [payload bytes, signature bytes]")
    payload, signature = outer
    if len(signature) != SIGNATURE_BYTES:
        raise MalformedTokenError(f"a token signature is {SIGNATURE_BYTES} bytes")
    obj = _unpack(payload, "token payload")
    if not isinstance(obj, dict) or set(obj) != _PAYLOAD_KEYS:
        raise MalformedTokenError(f"a token payload must have exactly the keys {sorted(_PAYLOAD_KEYS)}")
    if obj["v"] != TOKEN_VERSION or isinstance(obj["v"], bool):
        raise MalformedTokenError(f"unsupported token version {obj['v']!r}")
    experiment, peer_id, owner = obj["x"], obj["id"], obj["o"]
    if not isinstance(experiment, str) or not NAME_RE.match(experiment):
        raise MalformedTokenError("token experiment must be an experiment name")
    if peer_id_problem(peer_id):
        raise MalformedTokenError("token peer id must be a canonical base58 peer id")
    if not isinstance(owner, bytes) or len(owner) != PUBLIC_KEY_BYTES:
        raise MalformedTokenError("token owner must be a 32-byte Ed25519 public key")
    iat, exp = _int(obj, "iat"), _int(obj, "exp")
    if iat > exp or exp - iat > MAX_VALIDITY_S:
        raise MalformedTokenError("token validity must be [issued, expires] within 10 years")
    return AdmissionToken(experiment, peer_id, iat, exp, owner), payload, signature


def _check_signature(token: AdmissionToken, payload: bytes, signature: bytes) -> None:
    try:
        VerifyKey(token.owner).verify(TOKEN_DOMAIN + payload, signature)
    except BadSignatureError:
        raise ForgedTokenError(f"bad signature on the token for peer {token.peer_id}") from None


def decode_token(data: object) -> AdmissionToken:
    """Decode a token and check it is signed by the owner key it names (not which owner)."""
    token, payload, signature = parse_token(data)
    if not crypto_core_ed25519_is_valid_point(token.owner):
        raise MalformedTokenError("token owner must be a valid Ed25519 public key")
    _check_signature(token, payload, signature)
    return token


def verify_token(data: object, *, owner: bytes, experiment: str, peer_id: str,
                 now: float | None = None) -> AdmissionToken:
    """The token if it admits ``peer_id`` to ``experiment`` under ``owner`` at ``now``.

    Raises the AdmissionError subclass that names the first problem (and OwnerKeyFormatError
    when ``owner`` itself is no valid key: a caller's mistake, not the peer's).
    """
    parse_owner_key(format_owner_key(owner))
    token = _verify_signed(data, owner, experiment)
    _check_claims(token, experiment, peer_id, time.time() if now is None else now)
    return token


def _verify_signed(data: object, owner: bytes, experiment: str) -> AdmissionToken:
    """Structure, owner, signature and experiment: what does not depend on who or when.

    The owner (a valid point: the policy checked it) is compared first, so tokens of other
    owners cost no curve or signature check.
    """
    token, payload, signature = parse_token(data)
    if token.owner != owner:
        raise WrongOwnerError(f"token signed by {token.owner_text[:24]}..., not by the "
                              f"experiment owner {format_owner_key(owner)[:24]}...")
    _check_signature(token, payload, signature)
    if token.experiment != experiment:
        raise WrongExperimentError(f"token is for experiment {token.experiment!r}, "
                                   f"not {experiment!r}")
    return token


def _check_claims(token: AdmissionToken, experiment: str, peer_id: str, now: float) -> None:
    if token.experiment != experiment:
        raise WrongExperimentError(f"token is for experiment {token.experiment!r}, "
                                   f"not {experiment!r}")
    if token.peer_id != peer_id:
        raise WrongPeerError(f"token is for peer {token.peer_id}, not {str(peer_id)[:64]}")
    if token.expired(now):
        raise ExpiredTokenError(f"token for peer {token.peer_id} expired at "
                                f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(token.expires))}")


def encode_token_text(token: bytes) -> str:
    """One line of base64 that carries a token by mail or chat."""
    return base64.b64encode(token).decode("ascii")


def decode_token_text(data: bytes) -> bytes:
    """Raw token bytes from a token file: its base64 line, or raw msgpack bytes."""
    if data[:1] == b"\x92":  # a msgpack array of two: raw bytes (base64 never starts so)
        return data
    text = data.strip()
    if len(text) > MAX_TOKEN_TEXT_CHARS:
        raise MalformedTokenError(f"a token file holds at most {MAX_TOKEN_TEXT_CHARS} characters")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedTokenError("the token file holds neither a base64 token nor a raw one") from None


# ---- policy -----------------------------------------------------------------------------


class AdmissionPolicy:
    """Which peers may announce experts and join averaging groups of one experiment.

    Open (no owner key, no listed peers): everyone. Otherwise: listed peers without a token,
    and peers presenting a valid token from the owner. Signature outcomes are cached by token
    digest (bounded LRU, thread-safe), so re-reading the same records costs a hash, not a
    signature check; peer id and expiry are checked on every call.
    """

    def __init__(self, owner_public_key: bytes | str | None, listed_peers: Iterable[str],
                 experiment: str) -> None:
        if isinstance(owner_public_key, str):
            owner_public_key = parse_owner_key(owner_public_key)
        if owner_public_key is not None:
            parse_owner_key(format_owner_key(owner_public_key))  # 32 bytes, a valid point
        self.owner = owner_public_key
        self.listed = frozenset(listed_peers)
        self.experiment = check_experiment(experiment)
        self._cache: OrderedDict[bytes, AdmissionToken | AdmissionError] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_spec(cls, spec: AdmissionSpec, experiment: str) -> AdmissionPolicy:
        """The policy of a manifest's validated ``admission`` section."""
        return cls(spec.owner, spec.peers, experiment)

    @property
    def open(self) -> bool:
        return self.owner is None and not self.listed

    def check(self, peer_id: str, token: bytes | None, now: float | None = None) -> AdmissionToken | None:
        """None when admitted without a token, the token when admitted by it; else raise."""
        if self.open:
            return None
        if not isinstance(peer_id, str):
            raise NotAdmittedError("a peer id must be a string")
        if peer_id in self.listed:
            return None
        if self.owner is None:
            raise NotAdmittedError(f"peer {str(peer_id)[:64]} is not listed in the manifest's "
                                   "admission.peers")
        if token is None:
            raise NotAdmittedError(f"peer {str(peer_id)[:64]} has no admission token")
        result = self._verified(token)
        if isinstance(result, AdmissionError):
            raise result
        _check_claims(result, self.experiment, peer_id, time.time() if now is None else now)
        return result

    def admits(self, peer_id: str, token: bytes | None, now: float | None = None) -> bool:
        """True when ``peer_id`` presenting ``token`` may take part; never raises on bad input."""
        try:
            self.check(peer_id, token, now)
        except AdmissionError:
            return False
        return True

    def admits_entry(self, entry: object) -> bool:
        """``admits`` for a verified registry entry (``records.ServerEntry``: ``peer_id``,
        ``token``), the shape of the records' ``admit`` filter."""
        return self.admits(getattr(entry, "peer_id", None), getattr(entry, "token", None))  # type: ignore[arg-type]

    def explain(self, peer_id: str, token: bytes | None, now: float | None = None) -> str | None:
        """None when admitted, else one line telling this node's operator what to do."""
        try:
            self.check(peer_id, token, now)
        except AdmissionError as exc:
            return (f"experiment {self.experiment!r} admits only peers its owner approved: {exc}; "
                    f"send your peer id {peer_id} to the experiment owner, who runs `volunteer "
                    f"admission issue --experiment {self.experiment} --peer {peer_id} ...`, then "
                    f"run `volunteer admission install TOKEN_FILE --experiment {self.experiment}`")
        return None

    def _verified(self, token: object) -> AdmissionToken | AdmissionError:
        """Owner, signature and experiment outcome of ``token`` (cached by digest)."""
        if not isinstance(token, bytes) or len(token) > MAX_TOKEN_BYTES:
            return MalformedTokenError(f"a token must be 1 to {MAX_TOKEN_BYTES} bytes")
        digest = hashlib.sha256(token).digest()
        with self._lock:
            hit = self._cache.get(digest)
            if hit is not None:
                self._cache.move_to_end(digest)
                return hit
        assert self.owner is not None
        result: AdmissionToken | AdmissionError
        try:
            result = _verify_signed(token, self.owner, self.experiment)
        except AdmissionError as exc:
            result = exc
        with self._lock:
            self._cache[digest] = result
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return result
