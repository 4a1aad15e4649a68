"""`duquant eval`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from duquant_cli.cli.common import clean_errors, err, out, print_json


def ppl_table(title: str, rows, base: float | None = None) -> Table:
    """Perplexity rows (label, pack, ppl) with their change against the first (or `base`)."""
    table = Table(title=title)
    for col, justify in (("model", "left"), ("perplexity", "right"), ("vs fp", "right")):
        table.add_column(col, justify=justify)
    ref = base if base is not None else (rows[0].ppl if rows else None)
    for r in rows:
        change = "" if r.pack is None or ref is None else f"{r.vs(ref):+.1%}"
        table.add_row(r.label, f"{r.ppl:.2f}", change)
    return table


@clean_errors
def eval_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Hugging Face causal-LM folder.")],
    text: Annotated[Path, typer.Option("--text", help="Plain-text file to score.")],
    packs: Annotated[
        list[Path] | None,
        typer.Option("--pack", help="Pack made from this model (repeatable)."),
    ] = None,
    windows: Annotated[int, typer.Option(help="Windows of text to score.")] = 8,
    length: Annotated[int, typer.Option(help="Tokens per window.")] = 512,
    offset: Annotated[int, typer.Option(help="First window of the text to score.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Perplexity of the floating-point model and of each pack, on the same windows of a text."""
    from duquant_cli.commands.evaluate import evaluate

    def note(label: str) -> None:
        if not as_json:
            err.print(f"evaluating {label} ...", highlight=False)

    result = evaluate(
        model_dir, text, packs or [], windows=windows, length=length, offset=offset,
        progress=note,
    )  # fmt: skip
    if as_json:
        print_json(result.to_json())
        return
    last = result.offset + result.windows - 1
    title = f"perplexity: {text.name}, windows {result.offset}..{last} x {result.length} tokens"
    out.print(ppl_table(title, result.rows))
