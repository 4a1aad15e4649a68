"""`duquant demo`."""

from __future__ import annotations

from typing import Annotated

import typer

from duquant_cli.cli.common import clean_errors, print_json
from duquant_cli.cli.pack import _print_summary


@clean_errors
def demo_cmd(
    minilm: Annotated[bool, typer.Option("--minilm", help="Pack MiniLM (fast).")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Run the main job on a real model shipped as a pip package."""
    from duquant_cli.commands.demo import demo_minilm

    summary = demo_minilm()
    if as_json:
        print_json(summary.to_json())
    else:
        _print_summary(summary)
