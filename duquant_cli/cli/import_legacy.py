"""`duquant import-legacy`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from duquant_cli.cli.common import clean_errors, err, mb, out, print_json
from duquant_cli.config import Precision, parse_layer_bits


@clean_errors
def import_legacy_cmd(
    npz_dir: Annotated[Path, typer.Argument(help="Folder of legacy per-layer .npz files.")],
    checkpoint: Annotated[
        Path,
        typer.Option("--checkpoint", help="The checkpoint the files were made for (gives W)."),
    ],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Pack folder to write.")],
    bits: Annotated[str, typer.Option(help="Precision wXaY (the legacy runtime ran w4a8).")] = (
        "w4a8"
    ),
    layer_bits: Annotated[
        list[str] | None, typer.Option(help="Per-layer precision REGEX=wXaY (repeatable).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing pack.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
) -> None:
    """Convert earlier openpi-side DuQuant .npz packs into a pack (scales recomputed as the
    legacy runtime did)."""
    from duquant_cli.commands.import_legacy import NOTE, import_legacy

    precision = Precision.parse(bits)
    per_layer = parse_layer_bits(layer_bits or [])
    if as_json:
        summary = import_legacy(
            npz_dir, checkpoint, out_dir, precision=precision, layer_bits=per_layer, force=force
        )
        print_json(summary.to_json())
        return
    with Progress(
        TextColumn("{task.description}", style="cyan"),
        BarColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task("importing", total=None)
        summary = import_legacy(
            npz_dir,
            checkpoint,
            out_dir,
            precision=precision,
            layer_bits=per_layer,
            force=force,
            progress=lambda name, _: bar.update(task, advance=1, description=name),
        )
    table = Table(title="import-legacy", show_header=False)
    table.add_row("pack", str(summary.out))
    table.add_row("layers", str(len(summary.layers)))
    table.add_row("precision", ", ".join(sorted({r.precision for r in summary.layers})))
    table.add_row("pack size", mb(sum(r.bytes for r in summary.layers)))
    worst = max((r.ortho_error for r in summary.layers), default=0.0)
    table.add_row("max |RR^T - I|", f"{worst:.1e}")
    table.add_row("time", f"{summary.seconds:.1f} s")
    out.print(table)
    err.print(f"note: {NOTE}", highlight=False)
