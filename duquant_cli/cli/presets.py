"""`duquant presets`, and the `--preset` option that `pack` and `calibrate` share."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from duquant_cli.cli.common import clean_errors, out, print_json
from duquant_cli.commands.presets import list_presets
from duquant_cli.config import QuantConfig
from duquant_cli.presets import get_preset

if TYPE_CHECKING:
    from duquant_cli.formats.selection import Selection

PresetOption = Annotated[
    str | None,
    typer.Option(
        "--preset",
        help="Layer selection and defaults of a model family (list: duquant presets); "
        "--include adds layers, --exclude removes some.",
    ),
]

# QuantConfig field -> the option that sets it (in `pack` and `calibrate`).
_OPTION_OF = {
    "precision": "bits",
    "layer_bits": "layer_bits",
    "block": "block",
    "block_out": "block_out",
    "permute": "permute",
    "smooth_lambda": "smooth",
    "rotation": "rotation",
    "row_rot": "row_rot",
    "group_size": "group_size",
    "weight_scheme": "weight_scheme",
    "clip_search": "clip_search",
    "act_scheme": "act_scheme",
    "act_clip": "act_clip",
    "alpha": "alpha",
    "rot_steps": "rot_steps",
    "seed": "seed",
}


def typed_fields(ctx: typer.Context) -> set[str]:
    """The QuantConfig fields whose option was given on the command line: a preset's defaults
    yield to those and replace only the options left at their default."""
    # By name: typer may bring its own copy of click's ParameterSource enum.
    sources = {name: getattr(ctx.get_parameter_source(name), "name", None) for name in ctx.params}
    typed = {name for name, src in sources.items() if src not in (None, "DEFAULT", "DEFAULT_MAP")}
    return {f for f, option in _OPTION_OF.items() if option in typed}


def with_preset(
    ctx: typer.Context, name: str | None, cfg: QuantConfig, sel: Selection
) -> tuple[QuantConfig, Selection]:
    """`cfg` and `sel` with preset `name` applied (unchanged without one): the preset's layers
    plus any --include, minus any --exclude; its defaults for the options not typed."""
    if name is None:
        return cfg, sel
    preset = get_preset(name)
    chosen = preset.selection(sel.include, sel.exclude, sel.scope, sel.default_exclude)
    return preset.config(cfg, typed_fields(ctx)), chosen


@clean_errors
def presets_cmd(
    name: Annotated[str | None, typer.Argument(help="Show only this preset.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
) -> None:
    """List the presets: which layers each selects, and its config defaults."""
    presets = list_presets(name)
    if as_json:
        print_json(presets)
        return
    for p in presets:
        table = Table(title=f"preset {p['name']}", show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column(overflow="fold")
        defaults = ", ".join(f"{k}={v}" for k, v in p["defaults"].items())
        rows = [("description", p["description"])]
        rows += [(key, "\n".join(p[key])) for key in ("include", "exclude")]
        for key, text in [*rows, ("defaults", defaults)]:
            table.add_row(key, escape(text) or "-")  # regexes hold [...]: not rich markup
        out.print(table)
