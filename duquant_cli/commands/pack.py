"""`pack`: checkpoint -> pack, streaming one layer at a time."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

import duquant_cli
from duquant_cli.commands.input_groups import InputGroups
from duquant_cli.config import Precision, QuantConfig, Rotation, RowRot
from duquant_cli.errors import CheckpointError, ConfigError
from duquant_cli.formats.checkpoint import (
    Checkpoint,
    checkpoint_name,
    open_checkpoint,
    source_record,
)
from duquant_cli.formats.pack import PackWriter
from duquant_cli.formats.selection import PlannedLayer, Selection, select_layers
from duquant_cli.formats.stats import Stats
from duquant_cli.math.bitpack import packed_cols
from duquant_cli.math.layer_pack import build_layer

Progress = Callable[[str, int], None]  # (layer name, weight bytes just processed)


@dataclass
class LayerResult:
    name: str
    shape: tuple[int, int]
    precision: str
    bytes: int
    source_bytes: int
    seconds: float = 0.0
    weight_rel_error: float | None = None


@dataclass
class PackSummary:
    """What a pack run did (or, with dry_run, would do)."""

    out: Path
    dry_run: bool
    layers: list[LayerResult]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    resumed: int = 0  # layers taken over from an interrupted run (--resume)

    @property
    def params(self) -> int:
        return sum(r.shape[0] * r.shape[1] for r in self.layers)

    @property
    def pack_bytes(self) -> int:
        return sum(r.bytes for r in self.layers)

    @property
    def fp16_bytes(self) -> int:
        return 2 * self.params

    @property
    def mb_per_s(self) -> float:
        src = sum(r.source_bytes for r in self.layers)
        return src / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict:
        return {
            "out": str(self.out),
            "dry_run": self.dry_run,
            "layers": [r.__dict__ | {"shape": list(r.shape)} for r in self.layers],
            "skipped": [{"key": k, "reason": r} for k, r in self.skipped],
            "resumed": self.resumed,
            "params": self.params,
            "pack_bytes": self.pack_bytes,
            "fp16_bytes": self.fp16_bytes,
            "size_vs_fp16": self.pack_bytes / self.fp16_bytes if self.fp16_bytes else None,
            "seconds": self.seconds,
            "mb_per_s": self.mb_per_s,
        }


def estimate_bytes(layer: PlannedLayer, cfg: QuantConfig) -> int:
    """Bytes a layer takes in the pack, from its shape and precision alone."""
    out_f, in_f = layer.out_features, layer.in_features
    p = layer.precision
    n = 0
    if p.quantize_weight:
        groups = in_f // (cfg.group_size or in_f)
        n += out_f * packed_cols(in_f, p.w_bits) + 4 * out_f * groups
        n += out_f * groups if cfg.weight_scheme.value == "asym" else 0
    else:
        n += 4 * out_f * in_f
    n += 8 * in_f if cfg.permute else 0
    if cfg.rotation.value != "none":
        b, bo = min(cfg.block, in_f), min(cfg.row_block, out_f)
        n += 4 * ((in_f // b) * b * b + (in_f % b) ** 2)
        if cfg.row_rot.value != "off":
            n += 4 * ((out_f // bo) * bo * bo + (out_f % bo) ** 2)
        if cfg.row_rot.value == "propagate" and layer.bias_key:
            n += 4 * out_f  # the rotated bias, stored in float32
    if cfg.calibrated:  # in1 = diag(1/s) R1, stored even without a rotation
        b = min(cfg.block, in_f)
        n += 4 * ((in_f // b) * b * b + (in_f % b) ** 2)
    return n


# What a pack built from statistics changes in the defaults: DuQuant's greedy rotations (zigzag
# and smoothing folded in), no output rotation, error-compensated rounding (see docs/quality.md).
CALIBRATED_DEFAULTS = {
    "calibrated": True,
    "rotation": Rotation.GREEDY,
    "row_rot": RowRot.OFF,
    "gptq": True,
}


def calibrated_config(**changes) -> QuantConfig:
    """The default config of a pack built from statistics, with `changes` applied."""
    return QuantConfig(**(CALIBRATED_DEFAULTS | changes))


def default_out(checkpoint: Path, cfg: QuantConfig) -> Path:
    return Path("packs") / f"{checkpoint_name(checkpoint)}-{cfg.precision}-b{cfg.block}"


def layer_meta(
    cfg: QuantConfig,
    precision: Precision,
    alpha: float | None = None,
    input_group: str | None = None,
) -> tuple[dict, dict]:
    """The manifest's per-layer `transform` and `quant` records.

    A calibrated layer adds to `transform`: `smoothed: true` (its in1 is diag(1/s) @ R1, not
    orthogonal), the smoothing `alpha` it was built with, `rot_steps`, and `input_group`: the
    first layer of the layers fed the same input, which share one transform (identical in1,
    perm, in2); to `quant`: `gptq`, whether the weight was rounded with error compensation.
    """
    transform = {
        "block": cfg.block,
        "block_out": cfg.row_block,
        "permute": cfg.permute,
        "rotation": cfg.rotation.value,
        "row_rot": cfg.row_rot.value,
        "calibrated": cfg.calibrated,
    }
    if cfg.calibrated:
        transform |= {
            "smoothed": True,
            "alpha": cfg.alpha if alpha is None else alpha,
            "rot_steps": cfg.rot_steps,
            "input_group": input_group,
        }
    quant = {
        "w_bits": precision.w_bits,
        "a_bits": precision.a_bits,
        "weight_scheme": cfg.weight_scheme.value,
        "group_size": cfg.group_size,
        "clip_search": cfg.clip_search,
        "act_scheme": cfg.act_scheme.value,
        "act_clip": cfg.act_clip,
        "act_mode": "dynamic" if precision.quantize_act else "none",
    }
    if cfg.calibrated:
        quant["gptq"] = cfg.gptq and precision.quantize_weight
    return transform, quant


def pack(
    checkpoint: str | Path,
    out: str | Path | None = None,
    *,
    config: QuantConfig | None = None,
    selection: Selection | None = None,
    force: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
    stats: Stats | str | Path | None = None,
    resume: bool = False,
    skip_bad: bool = False,
) -> PackSummary:
    """Pack a checkpoint's linear layers.

    Args:
        checkpoint: a safetensors file, a folder, a sharded index or a `.bin`/`.pt` state dict.
        out: pack folder; default `packs/<checkpoint>-<bits>-b<block>`.
        config: the quantization configuration (defaults: w4a8, block 16, hadamard, restore).
        selection: which layers (default: every linear weight but embeddings, norms, head).
        force: replace an existing pack at `out`.
        dry_run: plan only: list layers and estimated sizes, write nothing.
        progress: called after each layer with its name and source bytes.
        stats: calibration statistics (a `Stats` or its file, see `collect_stats`): builds
            DuQuant's smoothing, greedy rotations and zigzag from them; needs a config with
            `calibrated=True` (the default config when stats are given: `calibrated_config()`).
        resume: continue the interrupted run that left `.<out>.partial` beside `out` (same
            checkpoint and options), from its last finished layer; the pack is byte-identical to
            an uninterrupted run's. Without it, such a folder is an error (`force` discards it).
        skip_bad: leave out layers whose weight or bias holds NaN or Inf (recorded in the
            manifest's `skipped` and the summary) instead of refusing the checkpoint.

    Returns:
        A PackSummary.

    Example:
        >>> pack("model.safetensors", "packs/m", config=QuantConfig())  # doctest: +SKIP
    """
    cfg = config or (calibrated_config() if stats is not None else QuantConfig())
    if cfg.calibrated and stats is None:
        raise ConfigError("a calibrated config needs activation statistics (--calib STATS)")
    if stats is not None and not cfg.calibrated:
        raise ConfigError("statistics were given but the config is not calibrated")
    where = str(stats) if isinstance(stats, (str, Path)) else "the statistics"
    stats_file = Path(stats) if isinstance(stats, (str, Path)) else None
    if isinstance(stats, (str, Path)):
        stats = Stats.load(stats)
    sel = selection or Selection()
    checkpoint = Path(checkpoint)
    out_dir = Path(out) if out is not None else default_out(checkpoint, cfg)
    with open_checkpoint(checkpoint) as ckpt:
        plan = select_layers(ckpt, sel, cfg)
        if stats is not None:
            for pl in plan.layers:
                stats.require(pl.name, pl.in_features, where)
        results = [
            LayerResult(
                pl.name,
                (pl.out_features, pl.in_features),
                str(pl.precision),
                estimate_bytes(pl, cfg),
                pl.out_features * pl.in_features * ckpt.info(pl.weight_key).dtype.itemsize,
            )
            for pl in plan.layers
        ]
        if dry_run:
            return PackSummary(out_dir, True, results, plan.skipped)
        header = {
            "tool": {"name": "duquant", "version": duquant_cli.__version__},
            "torch_version": torch.__version__,
            "created": None,  # set at commit; never in the tensor files nor the resume check
            "config": cfg.to_json(),
            "selection": sel.__dict__
            | {"include": list(sel.include)}
            | {"exclude": list(sel.exclude)},
            "source": ckpt.identity(),
        }
        if stats is not None:
            header["calibration"] = {"stats": where} | {
                k: v for k, v in stats.meta.items() if k != "format_version"
            }
        job = {k: v for k, v in header.items() if k != "created"} | {
            "layers": [pl.name for pl in plan.layers],
            "skip_bad": skip_bad,
            "files": _file_stats(ckpt, stats_file),
        }
        skipped = list(plan.skipped)
        groups = None if stats is None else InputGroups(ckpt, plan.layers, stats, cfg)
        bad: set[str] = set()
        start = time.perf_counter()
        with PackWriter(out_dir, force=force, resume=resume, job=job) as writer:
            for i, (pl, res) in enumerate(zip(plan.layers, results, strict=True)):
                if i < len(writer.resumed):  # finished before the interrupt
                    done = writer.resumed[i]
                    if isinstance(done, str):
                        skipped.append((pl.weight_key, done))
                        bad.add(pl.name)
                    else:
                        res.bytes = done.nbytes
                        res.weight_rel_error = done.info.get("weight_rel_error")
                    continue
                t0 = time.perf_counter()
                weight = ckpt.tensor(pl.weight_key)
                bias = ckpt.tensor(pl.bias_key) if pl.bias_key else None
                problem = _non_finite(pl.weight_key, weight)
                problem = problem or (_non_finite(pl.bias_key, bias) if bias is not None else None)
                if problem is not None:
                    key, why = problem
                    if not skip_bad:
                        raise CheckpointError(
                            f"{key}: {why} in layer {pl.name}; fix the checkpoint, or pass "
                            "--skip-bad to pack the other layers"
                        )
                    writer.skip(pl.name, f"{why} in {key}")
                    skipped.append((pl.weight_key, f"{why} in {key}"))
                    bad.add(pl.name)
                    continue
                if groups is None:
                    lp = build_layer(pl.name, weight, bias, cfg, pl.precision)
                    transform, quant = layer_meta(cfg, pl.precision)
                else:
                    lp = groups.layer(pl)
                    transform, quant = layer_meta(
                        cfg, pl.precision, lp.info.get("alpha"), groups.leader(pl.name)
                    )
                source = source_record(pl.weight_key, weight, pl.bias_key)
                entry = writer.add(
                    pl.name,
                    lp.tensors,
                    shape=(pl.out_features, pl.in_features),
                    precision=pl.precision,
                    transform=transform,
                    quant=quant,
                    source=source,
                    info=lp.info,
                )
                res.bytes = entry.nbytes
                res.seconds = time.perf_counter() - t0
                res.weight_rel_error = lp.info.get("weight_rel_error")
                if progress:
                    progress(pl.name, res.source_bytes)
                del weight, bias, lp
            if len(bad) == len(plan.layers):
                raise CheckpointError(
                    f"{checkpoint}: every selected layer holds NaN or Inf values; nothing to pack"
                )
            header["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            if skipped:
                header["skipped"] = [{"key": k, "reason": r} for k, r in skipped]
            writer.commit(header)
        packed = [r for r in results if r.name not in bad]
        seconds = time.perf_counter() - start
        return PackSummary(out_dir, False, packed, skipped, seconds, len(writer.resumed))


def _non_finite(key: str, t: torch.Tensor) -> tuple[str, str] | None:
    """(key, "N NaN and M Inf value(s)") when the tensor is not all finite.

    A NaN or Inf anywhere makes the sum non-finite, and a float32 sum is several times faster
    than `isfinite` on half-precision weights; only a non-finite sum (or an overflow) is looked
    at element by element.
    """
    if math.isfinite(float(t.sum(dtype=torch.float32))):
        return None
    finite = torch.isfinite(t)
    if bool(finite.all()):
        return None
    nan = int(torch.isnan(t).sum())
    inf = int(finite.numel() - finite.sum()) - nan
    parts = [f"{nan} NaN"] * bool(nan) + [f"{inf} Inf"] * bool(inf)
    return key, " and ".join(parts) + " value(s)"


def _file_stats(ckpt: Checkpoint, stats_file: Path | None) -> list[list]:
    """Name, size and modification time of each input file: a resumed run must read the same."""
    paths = [*ckpt.files, *([stats_file] if stats_file else [])]
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]
