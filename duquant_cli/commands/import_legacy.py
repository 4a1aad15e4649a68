"""`import-legacy`: a folder of earlier openpi-side per-layer `.npz` packs -> a pack.

The legacy files hold transforms but no weights (the legacy runtime transformed and quantized
the model's own weight at load time), so the checkpoint is needed: W' is rebuilt from it and
quantized with the legacy runtime's per-row 5-point scale grid, so a converted pack gives what
that runtime gave. Every file is read and checked before the pack is written.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import duquant_cli
from duquant_cli.config import Precision, QuantConfig, Rotation, RowRot
from duquant_cli.errors import ConfigError, MismatchError, TransformError
from duquant_cli.formats.checkpoint import (
    FLOAT_DTYPES,
    Checkpoint,
    open_checkpoint,
    source_record,
)
from duquant_cli.formats.legacy import (
    SOURCE_FORMAT,
    LegacyLayer,
    block_diag,
    check_orthogonal,
    match_files,
    read_layer,
)
from duquant_cli.formats.pack import PackWriter
from duquant_cli.math.blocks import BlockDiag
from duquant_cli.math.layer_pack import ORTHO_TOL
from duquant_cli.math.legacy import LEGACY_DIVISORS, LEGACY_GRID, legacy_layer
from duquant_cli.math.permutation import is_permutation

Progress = Callable[[str, int], None]  # (layer name, weight bytes just processed)
ROTATION = "legacy-svd"  # the per-layer transform's `rotation` of an imported layer
NOTE = (
    "imported from openpi-side DuQuant .npz files; the files' weight_scale was ignored (as the "
    "legacy runtime did): per-row scales recomputed from W' = Rout W[:, perm] Rin with the "
    "legacy grid max|row|/qmax/a, a in (0.5, 0.75, 1.0, 1.25, 1.5). Activations are dynamic "
    "per token; the legacy runtime's static per-channel p99.9 scales come from "
    "calibrating(model, percentile=99.9)."
)


@dataclass
class ImportedLayer:
    name: str
    file: str
    shape: tuple[int, int]
    precision: str
    bytes: int
    weight_rel_error: float | None
    ortho_error: float


@dataclass
class ImportSummary:
    """What an import wrote."""

    out: Path
    layers: list[ImportedLayer]
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "source_format": SOURCE_FORMAT,
            "layers": [r.__dict__ | {"shape": list(r.shape)} for r in self.layers],
            "pack_bytes": sum(r.bytes for r in self.layers),
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class _Planned:
    name: str
    weight_key: str
    bias_key: str | None
    legacy: LegacyLayer
    perm: torch.Tensor | None
    rin: BlockDiag | None
    rout: BlockDiag | None
    ortho_error: float


def _linear_names(ckpt: Checkpoint) -> list[str]:
    """Layer names of the checkpoint's 2-D float `*.weight` tensors, in checkpoint order."""
    names = []
    keys = ckpt.keys()
    for key in keys:
        if key.endswith(".weight"):
            info = ckpt.info(key)
            if len(info.shape) == 2 and info.dtype in FLOAT_DTYPES:
                names.append(key[: -len(".weight")])
    return names


def _shape(ckpt: Checkpoint, name: str) -> tuple[int, int]:
    out_f, in_f = ckpt.info(name + ".weight").shape
    return out_f, in_f


def _plan(name: str, path: Path, shape: tuple[int, int], keys: set[str]) -> _Planned:
    """Read one legacy file and check it against the checkpoint layer it names."""
    layer = read_layer(path)
    out_f, in_f = shape
    meta_shape = (layer.meta.get("out_features", out_f), layer.meta.get("in_features", in_f))
    if meta_shape != (out_f, in_f):
        raise MismatchError(
            f"{path}: meta is for a {meta_shape[0]}x{meta_shape[1]} layer, checkpoint layer "
            f"{name} is {out_f}x{in_f}"
        )
    if layer.perm is not None and not is_permutation(layer.perm, in_f):
        raise TransformError(f"{path}: perm is not a permutation of {in_f} input channels")
    rin = block_diag(layer.rin, in_f, layer.block_size, "Rin", path)
    rout = block_diag(layer.rout, out_f, layer.block_out_size, "Rout", path)
    pairs = ((rin, "Rin"), (rout, "Rout"))
    errs = [check_orthogonal(bd, what, path, ORTHO_TOL) for bd, what in pairs if bd is not None]
    bias = name + ".bias"
    return _Planned(
        name,
        name + ".weight",
        bias if bias in keys else None,
        layer,
        layer.perm,
        rin,
        rout,
        max(errs, default=0.0),
    )


def _common(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


def _config(plans: list[_Planned], precision: Precision, layer_bits) -> QuantConfig:
    """The pack's config: the legacy settings most layers share (each layer's own are in its
    `transform`)."""
    block = _common([p.legacy.block_size for p in plans])
    block_out = _common([p.legacy.block_out_size for p in plans])
    smooth = _common([float(p.legacy.meta.get("lambda_smooth", 0.15)) for p in plans])
    return QuantConfig(
        precision=precision,
        layer_bits=layer_bits,
        block=block,
        block_out=None if block_out == block else block_out,
        permute=_common([p.perm is not None for p in plans]),
        smooth_lambda=min(max(smooth, 0.0), 1.0),
        rotation=_common([Rotation.SVD if p.rin or p.rout else Rotation.NONE for p in plans]),
        row_rot=_common([RowRot.RESTORE if p.rout else RowRot.OFF for p in plans]),
        clip_search=True,
    )


def _records(p: _Planned, precision: Precision) -> tuple[dict[str, Any], dict[str, Any]]:
    """The manifest's per-layer `transform` and `quant` of an imported layer."""
    rotated = p.rin is not None or p.rout is not None
    transform = {
        "block": p.legacy.block_size,
        "block_out": p.legacy.block_out_size,
        "permute": p.perm is not None,
        "rotation": ROTATION if rotated else Rotation.NONE.value,
        "row_rot": RowRot.RESTORE.value if p.rout is not None else RowRot.OFF.value,
        "calibrated": False,
        "source_format": SOURCE_FORMAT,
        "source_file": p.legacy.path.name,
    }
    quant = {
        "w_bits": precision.w_bits,
        "a_bits": precision.a_bits,
        "weight_scheme": "sym",
        "group_size": None,
        "clip_search": True,
        "clip_grid": list(LEGACY_GRID),
        "act_scheme": "sym",
        "act_clip": 1.0,
        "act_mode": "dynamic" if precision.quantize_act else "none",
    }
    return transform, quant


def import_legacy(
    npz_dir: str | Path,
    checkpoint: str | Path,
    out: str | Path,
    *,
    precision: Precision | str = "w4a8",
    layer_bits: tuple[tuple[str, Precision], ...] = (),
    force: bool = False,
    progress: Progress | None = None,
) -> ImportSummary:
    """Convert a folder of legacy per-layer `.npz` files into a pack.

    Args:
        npz_dir: the legacy pack folder (one `<sanitized layer name>.npz` per layer).
        checkpoint: the checkpoint those files were made for: W comes from it, and its SHA-256
            is recorded per layer as the pack's source.
        out: the pack folder to write.
        precision: weights and activations (default w4a8: the legacy runtime ran W4A8);
            `layer_bits` overrides it per layer regex, as in `pack`.
        force: replace an existing pack at `out`.
        progress: called after each layer with its name and source bytes.

    Returns:
        An ImportSummary.

    Raises:
        MismatchError: a file matches no layer or several, or its meta disagrees with the layer.
        TransformError: a perm that is not a permutation, or a rotation block that is not
            orthogonal (max |RR^T - I| >= 1e-5), named by file and block.
        CheckpointError: an unreadable file or checkpoint.

    Example:
        >>> import_legacy("duquant_packed", "pi05.safetensors", "packs/pi05")  # doctest: +SKIP
    """
    precision = Precision.parse(precision) if isinstance(precision, str) else precision
    npz_dir, out_dir = Path(npz_dir), Path(out)
    start = time.perf_counter()
    with open_checkpoint(checkpoint) as ckpt:
        names = _linear_names(ckpt)
        files = match_files(npz_dir, names)
        if not files:
            raise ConfigError(f"{npz_dir}: no legacy file matches a layer of {checkpoint}")
        keys = set(ckpt.keys())
        plans = [_plan(n, f, _shape(ckpt, n), keys) for n, f in files.items()]
        cfg = _config(plans, precision, layer_bits)
        results = []
        with PackWriter(out_dir, force=force) as writer:
            for p in plans:
                weight = ckpt.tensor(p.weight_key)
                prec = cfg.precision_for(p.name)
                lp = legacy_layer(weight, p.perm, p.rin, p.rout, prec)
                transform, quant = _records(p, prec)
                source = source_record(p.weight_key, weight, p.bias_key)
                entry = writer.add(
                    p.name,
                    lp.tensors,
                    shape=_shape(ckpt, p.name),
                    precision=prec,
                    transform=transform,
                    quant=quant,
                    source=source,
                    info=lp.info,
                )
                results.append(
                    ImportedLayer(
                        p.name,
                        p.legacy.path.name,
                        _shape(ckpt, p.name),
                        str(prec),
                        entry.nbytes,
                        lp.info.get("weight_rel_error"),
                        p.ortho_error,
                    )
                )
                if progress:
                    progress(p.name, weight.numel() * weight.element_size())
                del weight, lp
            header = {
                "tool": {"name": "duquant", "version": duquant_cli.__version__},
                "torch_version": torch.__version__,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "config": cfg.to_json(),
                "selection": {"include": [], "exclude": [], "scope": "", "default_exclude": False},
                "source": ckpt.identity(),
                "import": {
                    "source_format": SOURCE_FORMAT,
                    "path": str(npz_dir),
                    "files": len(plans),
                    "weight_scales": "recomputed",
                    "scale_divisors": list(LEGACY_DIVISORS),
                    "note": NOTE,
                },
            }
            writer.commit(header)
    return ImportSummary(out_dir, results, time.perf_counter() - start)
