"""Where admission keys and tokens live on disk: the owner's key file and a node's token.

- Owner key file: text, ``OWNER_KEY_HEADER`` then the 32-byte Ed25519 seed in hex; created
  0600 with ``O_EXCL`` (never world-readable, never overwritten), refused on load when
  group/others may read it.
- A node keeps its own token at ``<home>/admission/<experiment>.token`` (raw bytes, 0600);
  ``install_token`` validates a token before it is written, ``load_token`` re-checks its shape.

The token format and the policy are in ``volunteer.net.admission``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from nacl.bindings import crypto_core_ed25519_is_valid_point
from nacl.signing import SigningKey

from volunteer.fsutil import atomic_write_bytes
from volunteer.net.admission import (
    ADMISSION_DIR,
    MAX_OWNER_KEY_FILE_BYTES,
    MAX_TOKEN_BYTES,
    OWNER_KEY_HEADER,
    SEED_BYTES,
    TOKEN_SUFFIX,
    AdmissionToken,
    ExpiredTokenError,
    MalformedTokenError,
    OwnerKeyFileError,
    WrongExperimentError,
    WrongPeerError,
    check_experiment,
    decode_token,
    decode_token_text,
    new_signing_key,
    parse_token,
)


def create_owner_key(path: Path) -> SigningKey:
    """Create a new owner key file at ``path`` (0600); refuse when the file already exists."""
    path = Path(path)
    key = new_signing_key()
    text = f"{OWNER_KEY_HEADER}\n{bytes(key).hex()}\n".encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise OwnerKeyFileError(f"{path} already exists; refusing to overwrite an owner key "
                                "(pick another file name)") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return key


def load_owner_key(path: Path) -> SigningKey:
    """Load an owner key file written by ``create_owner_key``; OwnerKeyFileError if unusable."""
    path = Path(path)
    try:
        mode = path.stat().st_mode & 0o777
        with open(path, "rb") as f:
            data = f.read(MAX_OWNER_KEY_FILE_BYTES + 1)
    except FileNotFoundError:
        raise OwnerKeyFileError(f"{path}: no such owner key file (create one with "
                                "`volunteer admission keygen FILE`)") from None
    except IsADirectoryError:
        raise OwnerKeyFileError(f"{path} is a directory, not an owner key file") from None
    if mode & 0o077:
        raise OwnerKeyFileError(f"owner key file {path} has permissions {oct(mode)}; it must be "
                                f"readable by its owner only: run `chmod 600 {path}`")
    lines = data.decode("ascii", errors="replace").splitlines()
    seed = None
    if len(data) <= MAX_OWNER_KEY_FILE_BYTES and len(lines) == 2 and lines[0] == OWNER_KEY_HEADER:
        try:
            seed = bytes.fromhex(lines[1].strip())
        except ValueError:
            seed = None
    if seed is None or len(seed) != SEED_BYTES:
        raise OwnerKeyFileError(f"{path} is not an owner key file written by "
                                "`volunteer admission keygen`")
    key = SigningKey(seed)
    if not crypto_core_ed25519_is_valid_point(bytes(key.verify_key)):
        raise OwnerKeyFileError(f"{path} holds an invalid Ed25519 seed")
    return key


# ---- the node's own token ---------------------------------------------------------------


def token_path(home: Path, experiment: str) -> Path:
    """Where a node keeps its token for ``experiment``: ``<home>/admission/<experiment>.token``."""
    return Path(home) / ADMISSION_DIR / (check_experiment(experiment) + TOKEN_SUFFIX)


def load_token(home: Path, experiment: str) -> bytes | None:
    """This node's token for ``experiment`` (None when none is installed).

    Raises MalformedTokenError naming the file when it is not a token (install a new one).
    """
    path = token_path(home, experiment)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TOKEN_BYTES + 1)
    except FileNotFoundError:
        return None
    try:
        parse_token(data)
    except MalformedTokenError as exc:
        raise MalformedTokenError(f"{path}: {exc}; install a new token with `volunteer admission "
                                  f"install TOKEN_FILE --experiment {experiment}`") from None
    return data


def install_token(home: Path, experiment: str, data: bytes, *, peer_id: str | None = None,
                  now: float | None = None) -> AdmissionToken:
    """Validate ``data`` (raw or base64) and store it as this node's token for ``experiment``.

    Refuses tokens that do not parse, carry a bad signature, or name another experiment; with
    ``peer_id``, also tokens for another peer, and with ``now``, expired ones.
    """
    raw = decode_token_text(data)
    token = decode_token(raw)
    if token.experiment != experiment:
        raise WrongExperimentError(f"token is for experiment {token.experiment!r}, not {experiment!r}")
    if peer_id is not None and token.peer_id != peer_id:
        raise WrongPeerError(f"token is for peer {token.peer_id}, but this node is {peer_id}: ask "
                             f"the owner for a token for {peer_id}")
    if now is not None and token.expired(now):
        raise ExpiredTokenError("token expired at " + time.strftime(
            "%Y-%m-%d %H:%M UTC", time.gmtime(token.expires)) + "; ask the owner for a new one")
    path = token_path(home, experiment)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write_bytes(path, raw, mode=0o600)
    return token
