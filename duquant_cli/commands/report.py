"""One table model for per-layer rows, shared by `duquant inspect` (a pack on disk) and
`render_status(model)` (a live model), so both read the same way.

A row is a plain dict; a column says how to show one cell of it. Columns both sources fill
(name, shape, precision, activations, row_rot) are defined once here. A missing value shows '-'.
Building a rich `Table` prints nothing; the caller decides where it goes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rich import box
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from torch import nn

Row = dict[str, Any]
MISSING = "-"


@dataclass(frozen=True)
class Column:
    """header: the column title; cell: the text for one row (None shows as '-')."""

    header: str
    cell: Callable[[Row], str | None]
    justify: str = "left"


def human_bytes(n: int | None) -> str | None:
    """Bytes in the largest unit that keeps a number >= 1 (decimal units, like `ls -h --si`)."""
    if n is None:
        return None
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return None  # unreachable


def sci(x: float | None, digits: int = 1) -> str | None:
    return None if x is None else f"{x:.{digits}e}"


def short(x: float | None) -> str | None:
    """Two significant digits, in the shortest of fixed or exponent notation."""
    return None if x is None else f"{x:.2g}"


def _get(key: str) -> Callable[[Row], str | None]:
    def cell(row: Row) -> str | None:
        v = row.get(key)
        if isinstance(v, bool):
            return "on" if v else "off"
        return None if v is None else str(v)

    return cell


def _shape(row: Row) -> str | None:
    s = row.get("shape")
    return None if not s else "x".join(str(d) for d in s)


def _blocks(row: Row) -> str | None:
    if row.get("block") is None:
        return None
    return f"{row['block']}/{row.get('block_out') or row['block']}"


def _transform(row: Row) -> str | None:
    kind = row.get("rotation")
    if kind is None:
        return None
    return f"smooth+{kind}" if row.get("smoothed") else kind


def _codes(row: Row) -> str | None:
    return human_bytes(row.get("code_bytes")) if row.get("weight_codes") else None


def _scales(row: Row) -> str | None:
    vals = [row.get(k) for k in ("scale_min", "scale_median", "scale_max")]
    return None if None in vals else "/".join(f"{v:.2g}" for v in vals)


COLUMNS: dict[str, Column] = {
    "name": Column("layer", _get("name")),
    "shape": Column("shape", _shape, "right"),
    "precision": Column("bits", _get("precision")),
    "blocks": Column("blocks", _blocks, "right"),
    "permute": Column("perm", _get("permute")),
    "transform": Column("transform", _transform),
    "row_rot": Column("rows", _get("row_rot")),
    "activations": Column("activations", _get("activations")),
    "codes": Column("codes", _codes, "right"),
    "ortho_error": Column("ortho err", lambda r: sci(r.get("ortho_error"), 0), "right"),
    "weight_rel_error": Column("w err", lambda r: short(r.get("weight_rel_error")), "right"),
    "scales": Column("scale min/med/max", _scales, "right"),
    "backend": Column("backend", _get("backend")),
    "device": Column("device", _get("device")),
    "dtype": Column("dtype", _get("dtype")),
    "cached": Column("cached", lambda r: None if "cached" not in r else str(r["cached"])),
    "prep": Column("prep", _get("prep")),
    "bytes": Column("bytes", lambda r: human_bytes(r.get("bytes")), "right"),
}
INSPECT_COLUMNS = (
    "name", "shape", "precision", "blocks", "permute", "transform", "row_rot", "activations",
    "codes", "ortho_error", "weight_rel_error", "scales",
)  # fmt: skip
STATUS_COLUMNS = (
    "name", "shape", "precision", "backend", "device", "dtype", "cached", "prep", "activations",
    "row_rot", "bytes",
)  # fmt: skip


def rows_table(rows: Iterable[Row], columns: Sequence[str], *, title: str | None = None) -> Table:
    """A rich Table of `rows`, one column per name in `columns` (keys of COLUMNS)."""
    rows = list(rows)
    cols = [COLUMNS[c] for c in columns]
    cells = [[col.cell(row) or MISSING for col in cols] for row in rows]
    # Cells and titles are data (layer names come from checkpoints): plain Text, never markup.
    table = Table(title=_plain(title), box=box.SIMPLE_HEAD, pad_edge=False)
    for i, (key, col) in enumerate(zip(columns, cols, strict=True)):
        # On a narrow terminal the other columns give way: a layer's name is what identifies it.
        keep = max((len(c[i]) for c in cells), default=0) if key == "name" else None
        table.add_column(
            col.header,
            justify=col.justify,  # type: ignore[arg-type]
            no_wrap=True,
            min_width=min(keep, 48) if keep else None,
        )
    for c in cells:
        table.add_row(*map(Text, c))
    return table


def _plain(title: str | None) -> Text | None:
    return None if title is None else Text(title)


def pairs_table(pairs: Iterable[tuple[str, str]], *, title: str | None = None) -> Table:
    """A two-column key/value table without a header: pack headers and totals."""
    table = Table(title=_plain(title), show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in pairs:
        table.add_row(Text(key), Text(value))
    return table


def render_status(model: nn.Module, *, title: str = "duquant status") -> Table:
    """`status(model)` as the same table `duquant inspect` draws for a pack.

    Example:
        >>> from rich import print
        >>> print(render_status(model))  # doctest: +SKIP
    """
    from duquant_cli.runtime.status import status  # torch: imported only when a model exists

    return rows_table(status(model), STATUS_COLUMNS, title=title)
