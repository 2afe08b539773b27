"""The typer application object and the ``main`` entry point."""

import typer

app = typer.Typer(help="volunteer: lend your GPU or CPU to train one large neural network.")


@app.command()
def version() -> None:
    """Print the installed version."""
    from volunteer import __version__

    typer.echo(__version__)


def main() -> None:
    """Console-script entry point."""
    app()
