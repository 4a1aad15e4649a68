"""`duquant demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from duquant_cli.cli.common import clean_errors, err, mb, out, print_json
from duquant_cli.cli.pack import _print_summary


@clean_errors
def demo_cmd(
    minilm: Annotated[
        bool, typer.Option("--minilm", help="Only pack MiniLM data-free (seconds).")
    ] = False,
    work_dir: Annotated[Path, typer.Option(help="Where the demo's packs go.")] = Path("packs/demo"),
    bits: Annotated[str, typer.Option(help="Precision wXaY of the packs.")] = "w4a8",
    block: Annotated[int, typer.Option(help="Block size of the packs.")] = 16,
    windows: Annotated[int, typer.Option(help="Windows of 512 tokens scored.")] = 8,
    calib_windows: Annotated[int, typer.Option(help="Windows calibrated on, after those.")] = 8,
    force: Annotated[
        bool, typer.Option(help="Replace whatever is where the packs go (not only packs).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """SmolLM2-135M end to end: calibrate, pack (round-to-nearest, data-free, DuQuant), load,
    and compare perplexity on text calibration never saw."""
    from duquant_cli.commands.demo import demo_minilm, demo_smollm2

    if minilm:
        summary = demo_minilm(work_dir / "minilm-w4a8-b16")
        if as_json:
            print_json(summary.to_json())
        else:
            _print_summary(summary)
        return

    def say(line: str) -> None:
        if not as_json:
            err.print(f"[cyan]{line}[/cyan] ...", highlight=False)

    result = demo_smollm2(
        work_dir,
        bits=bits,
        block=block,
        eval_windows=windows,
        calib_windows=calib_windows,
        force=force,
        progress=say,
    )
    if as_json:
        print_json(result.to_json())
        return
    first, last = result.eval_windows
    c0, c1 = result.calib_windows
    table = Table(
        title=f"SmolLM2-135M, {bits}, block {block}: perplexity on {result.text} windows "
        f"{first}..{last} x {result.length} tokens (calibrated on windows {c0}..{c1})"
    )
    for col in ("model", "perplexity", "vs fp32", "pack", "pack time"):
        table.add_column(col, justify="left" if col in ("model", "pack") else "right")
    base = result.rows[0].ppl
    for r in result.rows:
        summary = result.packs.get(r.label)
        table.add_row(
            r.label,
            f"{r.ppl:.2f}",
            f"{r.vs(base):+.1%}" if r.pack else "",
            f"{mb(summary.pack_bytes)}, {len(summary.layers)} layers" if summary else "",
            f"{summary.seconds:.1f} s" if summary else "",
        )
    out.print(table)
    out.print(
        f"calibration {result.calibrate_seconds:.1f} s; packs in {result.work_dir}",
        highlight=False,
    )
