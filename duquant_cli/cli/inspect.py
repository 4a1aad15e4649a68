"""`duquant inspect`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from duquant_cli.cli.common import clean_errors, out, print_json
from duquant_cli.commands.inspect import PackReport, inspect_pack
from duquant_cli.commands.report import INSPECT_COLUMNS, human_bytes, pairs_table, rows_table
from duquant_cli.errors import ConfigError, MismatchError, PackError

if TYPE_CHECKING:
    from duquant_cli.commands.stale import SourceCheck
    from duquant_cli.commands.verify import VerifyReport


@clean_errors
def inspect_cmd(
    pack_dir: Annotated[Path, typer.Argument(help="Pack folder.")],
    layer: Annotated[
        str | None, typer.Option("--layer", help="Only layers whose name matches this regex.")
    ] = None,
    verify: Annotated[
        bool,
        typer.Option("--verify", help="Re-hash every file and check every invariant (slow)."),
    ] = False,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint", help="Name layers whose source weights changed since packing."
        ),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option("--plot", help="Write a PNG of the errors (needs the plot extra)."),
    ] = None,
    stats: Annotated[
        Path | None,
        typer.Option("--stats", help="Calibration stats: add a layer's activations to --plot."),
    ] = None,
    plot_layer: Annotated[
        str | None,
        typer.Option("--plot-layer", help="Layer of the activation plot (default: first)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Show a pack: header, one row per layer, totals; --verify and --checkpoint check it."""
    if (stats is not None or plot_layer is not None) and plot is None:
        raise ConfigError("--stats and --plot-layer only go with --plot FILE.png")
    report = inspect_pack(pack_dir, layer=layer)
    # The slow paths import torch, so they are imported only when asked for.
    if plot is not None:
        from duquant_cli.commands.plot import plot_data, save_plot

        data = plot_data(pack_dir, stats=stats, layer=layer, act_layer=plot_layer)
        report.plot = str(save_plot(data, plot))
    checked = None
    if verify:
        from duquant_cli.commands.verify import verify_pack

        checked = verify_pack(pack_dir, layer=layer)
        report.verify = checked.to_json()
    source = None
    if checkpoint is not None:
        from duquant_cli.commands.stale import check_source

        source = check_source(pack_dir, checkpoint, layer=layer)
        report.checkpoint = source.to_json()
    if as_json:
        print_json(report.to_json())
    else:
        _print_report(report, checked, source)
    _fail(report, checked, source)


def _print_report(
    report: PackReport, checked: VerifyReport | None, source: SourceCheck | None
) -> None:
    out.print(pairs_table(_header(report), title=f"pack {report.path}"))
    cfg = [(k, _value(v)) for k, v in report.header["config"].items()]
    out.print(pairs_table(cfg, title="quantization config"))
    title = f"{len(report.layers)} layers"
    if report.layer_filter:
        title += f" matching {report.layer_filter}"
    table = rows_table(report.layers, INSPECT_COLUMNS, title=title)
    if out.is_terminal:
        out.print(table)
    else:  # piped into a file or a pager: the whole table, not one squeezed to 80 columns
        wide = out.measure(table, options=out.options.update_width(1000)).maximum
        Console(width=max(out.width, wide)).print(table)
    out.print(pairs_table(_totals(report.totals), title="totals"))
    if checked is not None:
        if checked.ok:
            out.print(
                f"verify: ok ({checked.files_checked} files hashed, {checked.layers_checked} "
                f"layers, {checked.tensors_read} tensors checked)",
                highlight=False,
            )
        for f in checked.failures:
            out.print(f"verify FAILED {f}", markup=False, highlight=False, soft_wrap=True)
    if source is not None:
        if source.ok:
            out.print(f"checkpoint: all {source.checked} layers match {source.path}")
        for what, names in (("stale", source.stale), ("missing", source.missing)):
            for name in names:
                out.print(f"checkpoint {what}: {name}", markup=False, highlight=False)
        for name in source.unrecorded:
            out.print(f"checkpoint unrecorded (no source hash): {name}", markup=False)
    if report.plot:
        out.print(f"wrote {report.plot}", highlight=False)


def _header(report: PackReport) -> list[tuple[str, str]]:
    h = report.header
    tool = h.get("tool") or {}
    src = h.get("source") or {}
    files = src.get("files") or []
    src_bytes = sum(int(f.get("bytes", 0)) for f in files)
    pairs = [
        ("format", f"{h['format']} v{h['format_version']}"),
        ("tool", f"{tool.get('name', '?')} {tool.get('version', '?')}"),
        ("torch", str(h.get("torch_version") or "-")),
        ("created", str(h.get("created") or "-")),
        ("source", f"{src.get('path', '-')} ({len(files)} file(s), {human_bytes(src_bytes)})"),
    ]
    if calib := h.get("calibration"):
        pairs.append(("calibration", str(calib.get("stats", "-"))))
    return pairs


def _totals(t: dict[str, Any]) -> list[tuple[str, str]]:
    rt = t["runtime_bytes"]
    ratio16 = f"{t['size_vs_fp16']:.3f}x" if t["size_vs_fp16"] is not None else "-"
    ratio32 = f"{t['size_vs_fp32']:.3f}x" if t["size_vs_fp32"] is not None else "-"
    return [
        ("layers", str(t["layers"])),
        ("parameters", f"{t['params']:,}"),
        ("pack on disk", str(human_bytes(t["pack_bytes"]))),
        ("layer tensors", str(human_bytes(t["tensor_bytes"]))),
        ("vs fp16 source", f"{ratio16} of {human_bytes(t['fp16_bytes'])}"),
        ("vs fp32 source", f"{ratio32} of {human_bytes(t['fp32_bytes'])}"),
        *(
            (
                f"runtime, {b} (fp32 / bf16)",
                f"{human_bytes(r['float32'])} / {human_bytes(r['bfloat16'])}",
            )
            for b, r in rt.items()
        ),
    ]


def _value(v: Any) -> str:
    if isinstance(v, list):
        return ", ".join("=".join(map(str, x)) if isinstance(x, list) else str(x) for x in v) or "-"
    return "-" if v is None else str(v)


def _fail(report: PackReport, checked: VerifyReport | None, source: SourceCheck | None) -> None:
    """Exit 1 through the CLI's error boundary when a check failed, naming what failed."""
    if checked is not None and not checked.ok:
        named = "; ".join(f"{f.where} [{f.check}]" for f in checked.failures[:8])
        more = f"; and {len(checked.failures) - 8} more" if len(checked.failures) > 8 else ""
        stale = f" (and {len(source.stale)} stale layer(s))" if source and source.stale else ""
        raise PackError(
            f"{report.path}: verify found {len(checked.failures)} problem(s): {named}{more}{stale}"
        )
    if source is not None and not source.ok:
        parts = [
            f"{len(names)} {what} layer(s): {', '.join(names[:8])}"
            + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            for what, names in (
                ("stale", source.stale),
                ("missing", source.missing),
                ("unrecorded", source.unrecorded),
            )
            if names
        ]
        raise MismatchError(f"{report.path} vs {source.path}: {'; '.join(parts)}")
