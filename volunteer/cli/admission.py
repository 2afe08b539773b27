"""``volunteer admission``: owner keys and admission tokens for closed experiments.

Commands: ``keygen`` (owner), ``issue`` (owner), ``install`` and ``show`` (volunteer). The
library side is ``volunteer.net.admission``; errors are one line with exit code 2 (bad
input: key, token, name or peer id) or 1 (file system).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import typer

from volunteer.cli.console import EXIT_BAD_INPUT, domain_errors, fail

HELP = """Admit only approved peers to an experiment (optional; experiments are open by default).

Workflow:

1. The experiment owner runs `volunteer admission keygen owner.key` and pastes the printed `admission:` lines into the manifest. Keep owner.key secret: whoever holds it admits peers.

2. A volunteer runs `volunteer admission show --experiment NAME` and sends the printed peer id to the owner.

3. The owner runs `volunteer admission issue --key owner.key --experiment NAME --peer PEER_ID --out peer.token` and sends peer.token back.

4. The volunteer runs `volunteer admission install peer.token --experiment NAME`, then `volunteer join`.

Records from peers without a valid token (and not listed under admission.peers) are ignored by every node of the experiment.
"""

admission_app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False,
                            context_settings={"help_option_names": ["-h", "--help"]})

EXPERIMENT_HELP = "The experiment name (the manifest's experiment.name)."
MAX_TOKEN_FILE_BYTES = 8192


@contextlib.contextmanager
def _admission_errors() -> Iterator[None]:
    """Bad keys, tokens, names and identities: one line on stderr, exit code 2."""
    from volunteer.manifest.admission import OwnerKeyFormatError
    from volunteer.net.admission import AdmissionError, OwnerKeyFileError

    with domain_errors():
        try:
            yield
        except (AdmissionError, OwnerKeyFileError, OwnerKeyFormatError) as exc:
            raise fail(str(exc), EXIT_BAD_INPUT) from None


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


@admission_app.command()
def keygen(out: Path = typer.Argument(..., help="File to create for the owner key (never overwritten).")) -> None:
    """Create an experiment owner key and print the manifest lines that name it."""
    from volunteer.net.admission import owner_key_text
    from volunteer.net.admission_files import create_owner_key

    with _admission_errors():
        key = create_owner_key(out)
    print("admission:")
    print(f'  owner: "{owner_key_text(key)}"')
    print(f"owner key written to {out} (mode 0600); keep it secret and backed up: it is the only way "
          "to admit new peers. Paste the two lines above into the manifest.", file=sys.stderr)


@admission_app.command()
def issue(
    key: Path = typer.Option(..., "--key", help="The owner key file from `volunteer admission keygen`."),
    experiment: str = typer.Option(..., "--experiment", help=EXPERIMENT_HELP),
    peer: str = typer.Option(..., "--peer", help="The volunteer's peer id (`volunteer admission show`)."),
    days: int = typer.Option(90, "--days", min=1, max=3650, help="Days until the token expires."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the token here instead of stdout."),
) -> None:
    """Sign a token admitting one peer id to an experiment (one base64 line)."""
    from volunteer.net.admission import encode_token_text, issue_token
    from volunteer.net.admission_files import load_owner_key

    now = time.time()
    with _admission_errors():
        owner = load_owner_key(key)
        token = issue_token(owner, experiment, peer, expires=now + days * 86400, issued_at=now)
        line = encode_token_text(token) + "\n"
        if out is not None:
            out.write_text(line)
    if out is None:
        sys.stdout.write(line)
    where = f"written to {out}" if out is not None else "printed above"
    print(f"token for peer {peer} in experiment {experiment}, valid until {_utc(now + days * 86400)}, "
          f"{where}; the volunteer installs it with `volunteer admission install TOKEN_FILE "
          f"--experiment {experiment}`", file=sys.stderr)


@admission_app.command()
def install(
    token_file: Path = typer.Argument(..., help="The token file the experiment owner sent."),
    experiment: str = typer.Option(..., "--experiment", help=EXPERIMENT_HELP),
    home: Optional[Path] = typer.Option(None, "--home", envvar="VOLUNTEER_HOME", show_envvar=True,
                                        help="Node home to install the token into."),
) -> None:
    """Check a token (signature, experiment, this node's peer id, expiry) and install it."""
    from volunteer.daemon.home import resolve_home
    from volunteer.net.admission import AdmissionError
    from volunteer.net.admission_files import install_token, token_path

    with _admission_errors():
        root = resolve_home(home)
        with open(token_file, "rb") as f:
            data = f.read(MAX_TOKEN_FILE_BYTES + 1)
        if len(data) > MAX_TOKEN_FILE_BYTES:
            raise fail(f"{token_file}: too large for a token file", EXIT_BAD_INPUT)
        peer_id = _own_peer_id(root)
        try:
            token = install_token(root, experiment, data, peer_id=peer_id, now=time.time())
        except AdmissionError as exc:
            raise fail(f"{token_file}: {exc}", EXIT_BAD_INPUT) from None
    print(f"installed the token for experiment {experiment} (peer {token.peer_id}, valid until "
          f"{_utc(token.expires)}) in {token_path(root, experiment)}")


@admission_app.command()
def show(
    experiment: str = typer.Option(..., "--experiment", help=EXPERIMENT_HELP),
    home: Optional[Path] = typer.Option(None, "--home", envvar="VOLUNTEER_HOME", show_envvar=True,
                                        help="Node home whose identity and token are shown."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Print this node's peer id (send it to the owner) and its token for the experiment, if any."""
    from volunteer.daemon.home import resolve_home
    from volunteer.net.admission import decode_token
    from volunteer.net.admission_files import load_token, token_path

    with _admission_errors():
        root = resolve_home(home)
        peer_id = _own_peer_id(root)
        path = token_path(root, experiment)
        raw = load_token(root, experiment)
        token = decode_token(raw) if raw is not None else None
    now = time.time()
    doc: dict[str, Any] = {"peer_id": peer_id, "home": str(root), "experiment": experiment,
                           "token_file": str(path), "token": None}
    if token is not None:
        doc["token"] = {"peer_id": token.peer_id, "for_this_node": token.peer_id == peer_id,
                        "issued_at": token.issued_at, "expires": token.expires,
                        "expired": token.expired(now), "owner": token.owner_text}
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    print(f"peer id   {peer_id}")
    print(f"home      {root}")
    if token is None:
        print(f"token     none for experiment {experiment}: send the peer id above to the experiment "
              f"owner, then run `volunteer admission install TOKEN_FILE --experiment {experiment}`")
        return
    days_left = (token.expires - now) / 86400
    state = "EXPIRED: ask the owner for a new one" if token.expired(now) else f"{days_left:.1f} days left"
    who = "this node" if token.peer_id == peer_id else "ANOTHER peer: ask the owner for one for this node"
    print(f"token     {path}")
    print(f"  peer    {token.peer_id} ({who})")
    print(f"  issued  {_utc(token.issued_at)}")
    print(f"  expires {_utc(token.expires)} ({state})")
    print(f"  owner   {token.owner_text}")


def _own_peer_id(root: Path) -> str:
    """This node's peer id from ``<home>/identity`` (created when absent, as `join` would).

    Imports libp2p (seconds on a small machine), so only the volunteer's commands call it.
    """
    from volunteer.net.host import IdentityError, load_or_create_identity, peer_id_of

    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        return peer_id_of(load_or_create_identity(root / "identity")).to_base58()
    except IdentityError as exc:
        raise fail(str(exc), EXIT_BAD_INPUT) from None
