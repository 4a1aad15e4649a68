"""`duquant apply`."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from duquant_cli.cli.common import clean_errors, out, print_json
from duquant_cli.commands.report import human_bytes


class DtypeName(str, Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


@clean_errors
def apply_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="The checkpoint the pack was made from.")],
    pack_dir: Annotated[Path, typer.Argument(help="The pack folder.")],
    device: Annotated[str, typer.Option(help="Device both layers run on.")] = "cpu",
    dtype: Annotated[DtypeName, typer.Option(help="Compute dtype.")] = DtypeName.float32,
    stats: Annotated[
        Path | None, typer.Option(help="Statistics file whose rows replace the random inputs.")
    ] = None,
    tokens: Annotated[int, typer.Option(help="Random input rows per layer.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of the random inputs.")] = 0,
    repeats: Annotated[int, typer.Option(help="Timed calls per layer (median).")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Compare each packed layer with its checkpoint layer: error, SQNR, memory, time."""
    from duquant_cli.commands.apply import apply

    result = apply(
        checkpoint,
        pack_dir,
        device=device,
        dtype=dtype.value,
        stats=stats,
        tokens=tokens,
        seed=seed,
        repeats=repeats,
    )
    if as_json:
        print_json(result.to_json())
        return
    title = f"{result.pack} vs {result.checkpoint} ({result.device}, {result.dtype})"
    table = Table(title=escape(title))
    for col in ("layer", "shape", "bits", "rel err", "SQNR dB", "bytes dq/fp", "µs dq/linear"):
        table.add_column(col, justify="left" if col in ("layer", "bits") else "right")
    for r in result.rows:
        table.add_row(
            escape(r.name) + ("*" if r.compared != "output" else ""),
            f"{r.shape[0]}x{r.shape[1]}",
            r.precision,
            f"{r.rel_error:.2e}",
            "exact" if r.sqnr_db is None else f"{r.sqnr_db:.1f}",
            f"{human_bytes(r.bytes_dq)} / {human_bytes(r.bytes_fp)}",
            f"{r.t_dq_us:,.0f} / {r.t_linear_us:,.0f}",
        )
    out.print(table)
    if any(r.compared != "output" for r in result.rows):
        out.print("* propagate mode: compared with the rotated output y R^T", highlight=False)
    total_fp = sum(r.bytes_fp for r in result.rows)
    total_dq = sum(r.bytes_dq for r in result.rows)
    out.print(
        f"{len(result.rows)} layers on {result.inputs}; worst relative error "
        f"{result.worst_rel_error:.2e}; {human_bytes(total_dq)} vs {human_bytes(total_fp)} "
        "as nn.Linear",
        highlight=False,
    )
