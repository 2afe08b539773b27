"""``volunteer receipt``: this node's lifetime contribution to an experiment, signed.

Reads the home only (``<home>/contribution.json`` and the node's identity ``<home>/identity/identity.key``), so it works
whether or not the daemon runs. The receipt is JSON signed with the node's key (its libp2p
identity; see ``volunteer.daemon.receipt``); an experiment collects them and checks each
with ``volunteer receipt --verify FILE`` or ``volunteer.daemon.receipt.verify_receipt``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from volunteer.cli.console import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, fail


def receipt(
    home: Optional[Path] = typer.Option(None, "--home", envvar="VOLUNTEER_HOME", show_envvar=True,
                                        help="Node home whose contribution to report."),
    experiment: Optional[str] = typer.Option(None, "--experiment", "-e",
                                             help="Experiment to report (default: the one this home served last)."),
    as_json: bool = typer.Option(False, "--json", help="Print only the signed receipt (JSON), e.g. to send it."),
    verify: Optional[Path] = typer.Option(None, "--verify", metavar="FILE",
                                          help="Check a receipt file ('-' = stdin) instead: exit 0 and print its "
                                               "totals when the signature holds, 1 when it does not."),
) -> None:
    """Print this node's lifetime contribution (samples, updates, uptime, bytes served) as a record signed by its key.

    Works without a running daemon. Send the --json output to the experiment's organisers; they check it with `volunteer receipt --verify FILE`.
    """
    from volunteer.daemon.receipt import ReceiptError, make_receipt, verify_receipt

    if verify is not None:
        try:
            text = sys.stdin.read() if str(verify) == "-" else verify.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise fail(f"{verify}: {getattr(exc, 'strerror', None) or exc}", EXIT_BAD_INPUT) from None
        try:
            payload = verify_receipt(text)
        except ReceiptError as exc:
            raise fail(f"receipt does not verify: {exc}", EXIT_FAILED) from None
        if as_json:
            sys.stdout.write(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        else:
            print(f"valid receipt signed by {payload['peer_id']}")
            print(_summary(payload))
        raise typer.Exit(EXIT_OK)

    from volunteer.daemon.contribution import ContributionError
    from volunteer.daemon.home import resolve_home
    from volunteer.net.host import IdentityError

    root = resolve_home(home)
    try:
        doc = make_receipt(root, experiment)
    except (ContributionError, IdentityError) as exc:
        raise fail(str(exc), EXIT_FAILED) from None
    except OSError as exc:
        raise fail(f"{exc.filename or root}: {exc.strerror or exc}", EXIT_FAILED) from None
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        raise typer.Exit(EXIT_OK)
    payload = json.loads(doc["payload"])
    print(f"contribution of {payload['peer_id']} (home {root})")
    print(_summary(payload))
    print("signed receipt (send this; check it with `volunteer receipt --verify FILE`):")
    print(json.dumps(doc))


def _summary(p: dict) -> str:
    from datetime import datetime

    from volunteer.status.fmt import bytes_, duration

    since = datetime.fromtimestamp(float(p["since"])).strftime("%Y-%m-%d %H:%M")
    return (f"  experiment {p['experiment']}: {int(p['samples'])} samples, {int(p['updates'])} updates, "
            f"up {duration(p['uptime_s'])}, {bytes_(p['bytes_served'])} served, since {since}")
