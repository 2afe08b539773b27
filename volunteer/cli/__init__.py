"""Command-line interface (typer): one module per command; no business logic here."""
