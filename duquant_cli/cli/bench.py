"""`duquant bench`."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer
from rich.table import Table

from duquant_cli.cli.common import clean_errors, out, print_json
from duquant_cli.errors import CheckpointError, ConfigError


class Part(str, Enum):
    ALL = "all"
    PACK = "pack"
    FORWARD = "forward"


@clean_errors
def bench_cmd(
    part: Annotated[Part, typer.Option(help="Which benchmark to run.")] = Part.ALL,
    small: Annotated[bool, typer.Option(help="Scaled-down shapes, for quick checks.")] = False,
    bits: Annotated[str, typer.Option(help="Precision of the packs measured.")] = "w4a8",
    block: Annotated[int, typer.Option(help="Block size.")] = 16,
    repeats: Annotated[int, typer.Option(help="Timed calls per case (median kept).")] = 20,
    threads: Annotated[
        int | None, typer.Option(help="torch threads (default: torch's own).")
    ] = None,
    stack: Annotated[
        int,
        typer.Option(
            min=1,
            help="Time each backend as this many distinct copies run in turn, as a model's "
            "layers (weights out of cache).",
        ),
    ] = 1,
    compile_: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="Also time torch.compile'd dense layers, and a compiled model of Gemma MLP "
            "blocks, against eager.",
        ),
    ] = False,
    calibrated: Annotated[
        bool,
        typer.Option(
            help="Forward: pack from synthetic calibration statistics (smoothing, greedy "
            "rotations), as a calibrated model's pack, rather than data-free.",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Measure pack speed, forward speed against nn.Linear, and memory, side by side."""
    import torch

    from duquant_cli.commands.bench import (
        FORWARD_SHAPES,
        bench,
        bench_compile,
        bench_compile_lm,
        bench_compile_model,
        bench_pack,
    )

    if threads:
        torch.set_num_threads(threads)
    result: dict = {"threads": torch.get_num_threads(), "stack": stack, "calibrated": calibrated}
    if part in (Part.ALL, Part.FORWARD):
        shapes = tuple((o // 4, i // 4) for o, i in FORWARD_SHAPES) if small else FORWARD_SHAPES
        fwd = bench(
            shapes=shapes,
            bits=bits,
            block=block,
            repeats=repeats,
            stack=stack,
            calibrated=calibrated,
        )
        result |= {"layer_pack": fwd.pack, "forward": fwd.forward, "memory": fwd.memory}
        if compile_:
            result["compile"] = bench_compile(
                shapes=shapes, repeats=repeats, calibrated=calibrated, stack=stack
            )
            hidden, inner = (512, 4096) if small else (2048, 16384)
            result["compile_model"] = bench_compile_model(
                hidden, inner, repeats=repeats, calibrated=calibrated
            )
            try:
                result["compile_lm"] = bench_compile_lm(repeats=repeats)
            except (CheckpointError, ConfigError) as e:  # no transformers, no SmolLM2
                result["compile_lm_skipped"] = str(e)
    if part in (Part.ALL, Part.PACK):
        result["pack"] = bench_pack(small=small, block=block, bits=bits)
    if as_json:
        print_json(result)
        return
    _print(result)


def _table(title: str, columns: tuple[str, ...], rows) -> Table:
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*r)
    return t


def _shape(r: dict) -> str:
    return "x".join(map(str, r["shape"]))


def _print(result: dict) -> None:
    if "layer_pack" in result:
        rows = (
            (_shape(r), f"{r['seconds']:.2f}", f"{r['mb_per_s']:.0f}") for r in result["layer_pack"]
        )
        out.print(_table("pack time per layer", ("shape", "seconds", "MB/s (fp32 source)"), rows))
        backends = ("dense", "int8", "int4", "dense_torch", "dense_ops", "int8_ops")
        rows = (
            (
                _shape(r),
                r["dtype"],
                str(r["tokens"]),
                f"{r['linear_us']:.0f}",
                *(f"{r[b + '_ratio']:.3f}" if b + "_ratio" in r else "-" for b in backends),
                f"{r['first_us'] / r['second_us']:.2f} "
                f"({r['linear_first_us'] / r['linear_second_us']:.2f})",
            )
            for r in result["forward"]
        )
        cols = ("shape", "dtype", "tokens", "nn.Linear us", *backends, "1st/2nd (nn.Linear)")
        title = "forward: time / nn.Linear time at the same dtype (median, interleaved)"
        if result["stack"] > 1:
            title += f", stacks of {result['stack']} copies"
        if result["calibrated"]:
            title += ", calibrated packs"
        out.print(_table(title, cols, rows))
        rows = (
            (
                _shape(r),
                r["backend"],
                r["dtype"],
                f"{r['bytes']:,}",
                f"{r['vs_linear_same_dtype']:.3f}",
                f"{r['vs_bf16_weight']:.3f}",
            )
            for r in result["memory"]
        )
        cols = ("shape", "backend", "dtype", "bytes", "vs nn.Linear same dtype", "vs bf16 w")
        out.print(_table("memory per layer", cols, rows))
    if "compile" in result:
        rows = (
            (
                _shape(c),
                c["dtype"],
                str(c["tokens"]),
                f"{c['eager_us'] / c['linear_us']:.3f}",
                f"{c['compiled_vs_eager']:.3f}",
                f"{c['compiled_vs_linear']:.3f}",
                f"{c['compile_s']:.1f}",
                f"{c['rel_diff']:.1e}",
            )
            for c in result["compile"]
        )
        cols = (
            "shape",
            "dtype",
            "tokens",
            "eager / nn.Linear",
            "compiled / eager",
            "compiled / nn.Linear",
            "compile s",
            "rel. diff",
        )
        title = "torch.compile(fullgraph=True), dense (median)"
        if result["stack"] > 1:
            title += f", {result['stack']} copies compiled as one module"
        out.print(_table(title, cols, rows))
    if "compile_model" in result:
        rows = (
            (
                c["dtype"],
                str(c["tokens"]),
                f"{c['linear_us']:.0f}",
                f"{c['linear_compiled_vs_eager']:.3f}",
                f"{c['duquant_vs_linear']:.3f}",
                f"{c['duquant_compiled_vs_eager']:.3f}",
                f"{c['duquant_compiled_vs_linear']:.3f}",
                f"{c['compile_s']:.1f}",
                f"{c['rel_diff']:.1e} ({c['linear_rel_diff']:.1e})",
            )
            for c in result["compile_model"]
        )
        cols = (
            "dtype",
            "tokens",
            "nn.Linear model us",
            "nn.Linear: compiled / eager",
            "DuQuant / nn.Linear",
            "DuQuant: compiled / eager",
            "DuQuant compiled / nn.Linear",
            "compile s",
            "rel. diff (nn.Linear)",
        )
        title = f"torch.compile(fullgraph=True) of a model: {result['compile_model'][0]['model']}"
        out.print(_table(title + ", DuQuant dense layers (median)", cols, rows))
    if "compile_lm" in result:
        labels = [
            k.removesuffix("_vs_linear")
            for k in result["compile_lm"][0]
            if k.endswith("_vs_linear")
        ]
        rows = (
            (
                str(c["tokens"]),
                f"{c['linear_ms']:.1f}",
                *(f"{c[k + '_compiled_vs_eager']:.3f}" for k in labels),
                *(f"{c[k + '_vs_linear']:.3f}" for k in labels if k != "linear"),
                " / ".join(f"{c[k + '_rel_diff']:.1e}" for k in labels),
            )
            for c in result["compile_lm"]
        )
        cols = (
            "tokens",
            "nn.Linear eager ms",
            *(f"{k}: compiled / eager" for k in labels),
            *(f"{k} eager / nn.Linear" for k in labels if k != "linear"),
            "rel. diff compiled-eager (" + " / ".join(labels) + ")",
        )
        title = "torch.compile(fullgraph=True) of SmolLM2-135M, float32, data-free w4a8 pack"
        out.print(_table(title + " (median)", cols, rows))
    elif "compile_lm_skipped" in result:
        out.print(f"SmolLM2 compile benchmark skipped: {result['compile_lm_skipped']}")
    if "pack" in result:
        p = result["pack"]
        t = Table(title=f"pack: {p['checkpoint']}", show_header=False)
        t.add_row("parameters", f"{p['params']:,}")
        t.add_row("pack time", f"{p['pack_s']:.1f} s ({p['mb_per_s']:.0f} MB/s of bf16 weights)")
        t.add_row(
            "peak RSS",
            f"{p['peak_rss_mb']:.0f} MB (generating the checkpoint alone: "
            f"{p['generate_peak_rss_mb']:.0f} MB)",
        )
        t.add_row("pack size", f"{p['pack_bytes'] / 1e6:,.1f} MB")
        out.print(t)
