"""Assembles the commands; each lives in its own file under `duquant_cli/cli/`."""

from __future__ import annotations

from typing import Annotated

import typer

from duquant_cli.cli import apply, bench, calibrate, demo, import_legacy, inspect, pack, presets
from duquant_cli.cli import eval as eval_
from duquant_cli.cli.common import debug

app = typer.Typer(
    help="DuQuant post-training quantization: pack checkpoints, inspect and apply packs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main(
    show_tracebacks: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks on errors.")
    ] = False,
) -> None:
    debug["on"] = show_tracebacks


app.command("pack")(pack.pack_cmd)
app.command("calibrate")(calibrate.calibrate_cmd)
app.command("eval")(eval_.eval_cmd)
app.command("demo")(demo.demo_cmd)
app.command("bench")(bench.bench_cmd)
app.command("inspect")(inspect.inspect_cmd)
app.command("apply")(apply.apply_cmd)
app.command("presets")(presets.presets_cmd)
app.command("import-legacy")(import_legacy.import_legacy_cmd)


def main() -> None:
    app()
