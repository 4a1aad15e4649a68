"""`duquant calibrate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from duquant_cli.cli.common import clean_errors, err, mb, out, print_json
from duquant_cli.cli.presets import PresetOption


@clean_errors
def calibrate_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Hugging Face causal-LM folder.")],
    text: Annotated[Path, typer.Option("--text", help="Plain-text calibration file.")],
    out_file: Annotated[
        Path, typer.Option("--out", "-o", help="Statistics file to write (safetensors).")
    ],
    windows: Annotated[int, typer.Option(help="Windows of text to run.")] = 8,
    length: Annotated[int, typer.Option(help="Tokens per window.")] = 512,
    offset: Annotated[int, typer.Option(help="First window of the text to use.")] = 0,
    max_rows: Annotated[int, typer.Option(help="Input rows kept per layer.")] = 4096,
    preset: PresetOption = None,
    force: Annotated[bool, typer.Option(help="Replace an existing statistics file.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
) -> None:
    """Record each linear layer's input statistics on a text, for `duquant pack --calib`."""
    from duquant_cli.commands.calibrate import calibrate

    kwargs = dict(
        windows=windows,
        length=length,
        offset=offset,
        max_rows=max_rows,
        preset=preset,
        force=force,
    )
    if as_json:
        summary = calibrate(model_dir, text, out_file, **kwargs)
        print_json(summary.to_json())
        return
    with Progress(
        TextColumn("calibrating", style="cyan"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task("calibrating", total=windows)

        def tick(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        summary = calibrate(model_dir, text, out_file, progress=tick, **kwargs)
    table = Table(title="calibration", show_header=False)
    table.add_row("statistics", str(summary.out))
    last = summary.offset + summary.windows - 1
    where = f"windows {summary.offset}..{last} x {summary.length} tokens"
    table.add_row("text", f"{summary.text} ({where})")
    table.add_row("layers", str(summary.layers))
    table.add_row("rows per layer", str(summary.rows))
    table.add_row("size", mb(summary.bytes))
    table.add_row("time", f"{summary.seconds:.1f} s")
    out.print(table)
