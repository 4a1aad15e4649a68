"""`duquant pack`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn
from rich.table import Table

from duquant_cli.cli.common import clean_errors, err, mb, out, print_json
from duquant_cli.cli.presets import PresetOption, with_preset
from duquant_cli.config import Precision, QuantConfig, Rotation, RowRot, Scheme, parse_layer_bits


@clean_errors
def pack_cmd(
    ctx: typer.Context,
    checkpoint: Annotated[Path, typer.Argument(help="safetensors file, folder, index or .bin/.pt")],
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Pack folder (default: packs/<ckpt>-<bits>-b<B>)."),
    ] = None,
    bits: Annotated[str, typer.Option(help="Precision wXaY: w 2-8|16, a 4-8|16")] = "w4a8",
    block: Annotated[int, typer.Option(help="Input block size of the rotations.")] = 16,
    block_out: Annotated[
        int | None, typer.Option(help="Output row block size (default: --block).")
    ] = None,
    rotation: Annotated[Rotation, typer.Option(help="Block rotation kind.")] = Rotation.HADAMARD,
    row_rot: Annotated[RowRot, typer.Option(help="Output row rotation mode.")] = RowRot.RESTORE,
    permute: Annotated[bool, typer.Option(help="Zigzag permutation of input channels.")] = True,
    smooth: Annotated[
        float, typer.Option(help="Lambda pulling column energies toward their mean.")
    ] = 0.15,
    group_size: Annotated[
        int | None, typer.Option(help="Weight quantization group size (default: per channel).")
    ] = None,
    weight_scheme: Annotated[Scheme, typer.Option(help="Weight quantization.")] = Scheme.SYM,
    clip_search: Annotated[bool, typer.Option(help="MSE search of the weight clip.")] = True,
    act_scheme: Annotated[Scheme, typer.Option(help="Per-token activations.")] = Scheme.SYM,
    act_clip: Annotated[float, typer.Option(help="Activation range clip ratio.")] = 1.0,
    include: Annotated[
        list[str] | None, typer.Option(help="Regex a layer name must match (repeatable).")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option(help="Regex of layer names to leave out (repeatable).")
    ] = None,
    scope: Annotated[str, typer.Option(help="Only keys starting with this prefix.")] = "",
    default_exclude: Annotated[
        bool, typer.Option(help="Leave out embeddings, norms and the output head.")
    ] = True,
    layer_bits: Annotated[
        list[str] | None, typer.Option(help="Per-layer precision REGEX=wXaY (repeatable).")
    ] = None,
    calib: Annotated[
        Path | None,
        typer.Option(
            "--calib",
            help="Statistics from `duquant calibrate`: DuQuant's smoothing, greedy rotations and "
            "zigzag, fitted to them (default rotation greedy, row rotation off).",
        ),
    ] = None,
    alpha: Annotated[float, typer.Option(help="Smoothing exponent (with --calib).")] = 0.5,
    rot_steps: Annotated[
        int, typer.Option(help="Greedy rotation steps, best prefix kept (with --calib).")
    ] = 256,
    gptq: Annotated[
        bool, typer.Option(help="Error-compensating weight rounding (with --calib).")
    ] = True,
    seed: Annotated[int, typer.Option(help="Seed of every random choice.")] = 0,
    preset: PresetOption = None,
    force: Annotated[bool, typer.Option(help="Replace an existing pack.")] = False,
    resume: Annotated[
        bool, typer.Option(help="Continue an interrupted run from its last finished layer.")
    ] = False,
    skip_bad: Annotated[
        bool, typer.Option(help="Leave out (and list) layers with NaN/Inf instead of failing.")
    ] = False,
    dry_run: Annotated[bool, typer.Option(help="List layers and sizes; write nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
) -> None:
    """Pack a checkpoint's linear layers into a DuQuant pack."""
    from duquant_cli.commands.pack import pack
    from duquant_cli.formats.selection import Selection

    if calib is not None:  # DuQuant's recipe, where the option was not given
        rotation = rotation if _typed(ctx, "rotation") else Rotation.GREEDY
        row_rot = row_rot if _typed(ctx, "row_rot") else RowRot.OFF
    elif not _typed(ctx, "gptq"):
        gptq = False
    cfg = QuantConfig(
        precision=Precision.parse(bits),
        layer_bits=parse_layer_bits(layer_bits or []),
        block=block,
        block_out=block_out,
        permute=permute,
        smooth_lambda=smooth,
        rotation=rotation,
        row_rot=row_rot,
        group_size=group_size,
        weight_scheme=weight_scheme,
        clip_search=clip_search,
        act_scheme=act_scheme,
        act_clip=act_clip,
        calibrated=calib is not None,
        alpha=alpha,
        rot_steps=rot_steps,
        gptq=gptq,
        seed=seed,
    )
    sel = Selection(tuple(include or ()), tuple(exclude or ()), scope, default_exclude)
    cfg, sel = with_preset(ctx, preset, cfg, sel)
    opts = {
        "config": cfg,
        "selection": sel,
        "force": force,
        "resume": resume,
        "skip_bad": skip_bad,
        "stats": calib,
    }
    if dry_run or as_json:
        summary = pack(checkpoint, out_dir, dry_run=dry_run, **opts)
    else:
        with _LazyProgress() as tick:
            try:
                summary = pack(checkpoint, out_dir, progress=tick, **opts)
            except KeyboardInterrupt:
                tick.stop()
                err.print(
                    "[red]interrupted[/red]: nothing was published; the same command with "
                    "--resume continues from the finished layers",
                    soft_wrap=True,
                )
                raise typer.Exit(130) from None
    if as_json:
        print_json(summary.to_json())
        return
    _print_summary(summary)


def _typed(ctx: typer.Context, option: str) -> bool:
    """Whether `option` was given on the command line (not left at its default)."""
    source = getattr(ctx.get_parameter_source(option), "name", None)
    return source not in (None, "DEFAULT", "DEFAULT_MAP")


class _LazyProgress:
    """A progress bar over layers (with MB/s) that appears with the first finished layer, so an
    early error prints alone."""

    def __init__(self) -> None:
        self.bar: Progress | None = None

    def __call__(self, name: str, nbytes: int) -> None:
        if self.bar is None:
            self.bar = Progress(
                TextColumn("{task.description}", style="cyan"),
                BarColumn(),
                TransferSpeedColumn(),
                TimeElapsedColumn(),
                console=err,
                transient=True,
            )
            self.bar.start()
            self.task = self.bar.add_task("packing", total=None)
        self.bar.update(self.task, advance=nbytes, description=escape(name))

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def __enter__(self) -> _LazyProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _print_summary(summary) -> None:
    if summary.dry_run:
        table = Table(title=f"dry run: would write {escape(str(summary.out))}")
        for col in ("layer", "shape", "precision", "est. bytes"):
            table.add_column(col)
        for r in summary.layers:
            table.add_row(escape(r.name), f"{r.shape[0]}x{r.shape[1]}", r.precision, mb(r.bytes))
        out.print(table)
    for key, reason in summary.skipped:
        err.print(f"skipped {escape(key)}: {escape(reason)}", highlight=False)
    table = Table(title="pack" if not summary.dry_run else "estimate", show_header=False)
    table.add_row("pack", escape(str(summary.out)))
    if summary.resumed:
        table.add_row("resumed", f"{summary.resumed} finished layers from the interrupted run")
    table.add_row("layers", str(len(summary.layers)))
    table.add_row("parameters", f"{summary.params:,}")
    if not summary.dry_run:
        table.add_row("time", f"{summary.seconds:.1f} s ({summary.mb_per_s:,.0f} MB/s)")
    table.add_row("pack size", mb(summary.pack_bytes))
    table.add_row("vs fp16 source", f"{summary.pack_bytes / summary.fp16_bytes:.3f}x")
    out.print(table)
