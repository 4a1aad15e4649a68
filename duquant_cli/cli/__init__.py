"""The `duquant` command line: a thin typer shell over `duquant_cli.commands`."""

from duquant_cli.cli.app import app, main

__all__ = ["app", "main"]
