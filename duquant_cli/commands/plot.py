"""`inspect --plot`: the picture of what DuQuant does to a model.

Top: each layer's weight quantization error (from the manifest). Bottom, given calibration
statistics: one layer's per-channel max |x| before and after its input transform (in1, zigzag
permutation, in2): outlier channels flattened into their blocks is the whole point of DuQuant.
Needs the `plot` extra (matplotlib).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from duquant_cli.commands.inspect import inspect_pack
from duquant_cli.errors import ConfigError, MismatchError
from duquant_cli.formats.pack import Pack
from duquant_cli.formats.stats import Stats
from duquant_cli.math.blocks import apply_blocks


@dataclass
class PlotData:
    """names/errors: per layer; act_layer, before, after: per channel, or None without stats."""

    pack: str
    names: list[str]
    errors: list[float | None]
    act_layer: str | None = None
    before: list[float] | None = None
    after: list[float] | None = None


def transform_input(x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """x [T, in] in the packed basis, as layer_pack's docstring defines it: in1, perm, in2."""
    x = x.float()
    if "in1" in tensors:
        x = apply_blocks(x, tensors["in1"].float(), _float(tensors.get("in1_tail")))
    if "perm" in tensors:
        x = x[:, tensors["perm"].long()]
    if "in2" in tensors:
        x = apply_blocks(x, tensors["in2"].float(), _float(tensors.get("in2_tail")))
    return x


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def plot_data(
    pack_dir: str | Path,
    *,
    stats: str | Path | None = None,
    layer: str | None = None,
    act_layer: str | None = None,
) -> PlotData:
    """What `save_plot` draws: errors of the layers `layer` selects and, with `stats`, the
    activation maxima of `act_layer` (default: the first selected layer the stats cover)."""
    report = inspect_pack(pack_dir, layer=layer)
    data = PlotData(
        str(report.path),
        [r["name"] for r in report.layers],
        [r["weight_rel_error"] for r in report.layers],
    )
    if stats is None:
        if act_layer is not None:
            raise ConfigError("--plot-layer needs --stats STATS.safetensors")
        return data
    st = Stats.load(stats)
    if act_layer is None:
        act_layer = next((n for n in data.names if n in st), None)
        if act_layer is None:
            raise MismatchError(f"{stats}: no statistics for any of the pack's selected layers")
    row = next((r for r in report.layers if r["name"] == act_layer), None)
    if row is None:
        raise ConfigError(f"--plot-layer {act_layer!r}: no such layer in {report.path}")
    rows = st.require(act_layer, row["shape"][1], str(stats)).rows.float()
    tensors = Pack.open(pack_dir).load(act_layer)
    data.act_layer = act_layer
    data.before = rows.abs().amax(0).tolist()
    data.after = transform_input(rows, tensors).abs().amax(0).tolist()
    return data


def _peak_ratio(v: list[float]) -> float:
    t = torch.tensor(v)
    return float(t.max() / t.median().clamp_min(1e-30))


def save_plot(data: PlotData, path: str | Path) -> Path:
    """Draw `data` into a PNG at `path` (matplotlib's Agg canvas; no display needed)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'duquant[plot]'") from None
    path = Path(path)
    panels = 2 if data.before is not None else 1
    fig = Figure(figsize=(11, 3.6 * panels), layout="constrained")
    axes = fig.subplots(panels, 1, squeeze=False)[:, 0]
    ax = axes[0]
    xs = range(len(data.names))
    ax.bar(xs, [e if e is not None else 0.0 for e in data.errors], color="tab:blue", width=0.85)
    ax.set_title(f"{data.pack}: weight quantization error per layer")
    ax.set_ylabel("||Q(W') - W'|| / ||W'||")
    if len(data.names) <= 24:
        ax.set_xticks(list(xs), data.names, rotation=60, ha="right", fontsize=7)
    else:
        ax.set_xlabel("layer (manifest order)")
    if data.before is not None and data.after is not None:
        ax = axes[1]
        ch = range(len(data.before))
        ax.plot(ch, data.before, lw=0.8, color="tab:red", label="before transform")
        ax.plot(ch, data.after, lw=0.8, color="tab:green", label="after in1 / perm / in2")
        ax.set_yscale("log")
        ax.set_xlabel("input channel")
        ax.set_ylabel("max |x|")
        ax.set_title(
            f"{data.act_layer}: per-channel activation max, peak/median "
            f"{_peak_ratio(data.before):.1f} -> {_peak_ratio(data.after):.1f}"
        )
        ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
