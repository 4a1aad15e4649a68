"""`inspect`: a pack's header, one row per layer and totals, from the manifest alone.

Reading nothing but `manifest.json` (and importing no torch) keeps this instant on any pack;
`verify.py` and `stale.py` are the slow paths that read tensors or a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

from duquant_cli.config import Precision, compile_regex
from duquant_cli.errors import ConfigError, PackError
from duquant_cli.formats.manifest import MANIFEST, LayerEntry, read_manifest
from duquant_cli.runtime.memory import (
    DTYPE_BYTES,
    RUNTIME_BACKENDS,
    RUNTIME_DTYPES,
    layer_bytes,
)
from duquant_cli.runtime.support import choose

SCHEMA_VERSION = 1
# The words `status(model)` uses for a live layer; a calibrated one may add its percentile.
ACTIVATIONS_PATTERN = (
    r"^(dynamic|none|static \(uncalibrated\)|static \(calibrated(, p[0-9.e+-]+)?\))$"
)

_INT = {"type": "integer"}
_NUM = {"type": "number"}
_STR = {"type": "string"}
_BOOL = {"type": "boolean"}


def _opt(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": [schema["type"], "null"]}


def _obj(props: dict[str, Any], *, closed: bool = True) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": sorted(props),
        "additionalProperties": not closed,
    }


_RUNTIME = _obj({b: _obj({d: _INT for d in RUNTIME_DTYPES}) for b in RUNTIME_BACKENDS})
_NAMES = {"type": "array", "items": _STR}
LAYER_SCHEMA = _obj(
    {
        "name": _STR,
        "shape": {"type": "array", "items": _INT, "minItems": 2, "maxItems": 2},
        "params": _INT,
        "precision": _STR,
        "w_bits": _INT,
        "a_bits": _INT,
        "block": _opt(_INT),
        "block_out": _opt(_INT),
        "permute": _BOOL,
        "rotation": _STR,
        "smoothed": _BOOL,
        "row_rot": _STR,
        "activations": {"type": "string", "pattern": ACTIVATIONS_PATTERN},
        "act_mode": {"type": "string", "enum": ["dynamic", "static", "none"]},
        "act_calibrated": _BOOL,
        "weight_scheme": _opt(_STR),
        "group_size": _opt(_INT),
        "weight_codes": _BOOL,
        "code_bytes": _opt(_INT),
        "pack_bytes": _INT,
        "source_dtype": _opt(_STR),
        "weight_rel_error": _opt(_NUM),
        "ortho_error": _opt(_NUM),
        "scale_min": _opt(_NUM),
        "scale_median": _opt(_NUM),
        "scale_max": _opt(_NUM),
        "runtime_bytes": _RUNTIME,
    }
)
TOTALS_SCHEMA = _obj(
    {
        "layers": _INT,
        "params": _INT,
        "tensor_bytes": _INT,
        "pack_bytes": _INT,
        "fp16_bytes": _INT,
        "fp32_bytes": _INT,
        "size_vs_fp16": _opt(_NUM),
        "size_vs_fp32": _opt(_NUM),
        "runtime_bytes": _RUNTIME,
    }
)
VERIFY_SCHEMA = _obj(
    {
        "ok": _BOOL,
        "files_checked": _INT,
        "layers_checked": _INT,
        "tensors_read": _INT,
        "failures": {
            "type": "array",
            "items": _obj({"where": _STR, "layer": _opt(_STR), "check": _STR, "detail": _STR}),
        },
    }
)
CHECKPOINT_SCHEMA = _obj(
    {
        "path": _STR,
        "ok": _BOOL,
        "checked": _INT,
        "stale": _NAMES,
        "missing": _NAMES,
        "unrecorded": _NAMES,
    }
)
# The `--json` document (JSON Schema, draft 2020-12); docs/inspect.md explains every key.
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "duquant inspect --json",
    **_obj(
        {
            "schema_version": {"const": SCHEMA_VERSION},
            "pack": _STR,
            "format": _STR,
            "format_version": _INT,
            "tool": {"type": ["object", "null"]},
            "torch_version": _opt(_STR),
            "created": _opt(_STR),
            "source": {"type": ["object", "null"]},
            "selection": {"type": ["object", "null"]},
            "calibration": {"type": ["object", "null"]},
            "config": {"type": "object"},
            "layer_filter": _opt(_STR),
            "layers": {"type": "array", "items": LAYER_SCHEMA},
            "totals": TOTALS_SCHEMA,
            "verify": {"anyOf": [{"type": "null"}, VERIFY_SCHEMA]},
            "checkpoint": {"anyOf": [{"type": "null"}, CHECKPOINT_SCHEMA]},
            "plot": _opt(_STR),
        }
    ),
}


@dataclass
class PackReport:
    """The manifest header, rows and totals (see SCHEMA); `verify`, `checkpoint` and `plot`
    hold the JSON of the slow checks when a caller ran them, else None."""

    path: Path
    header: dict[str, Any]
    layers: list[dict[str, Any]]
    totals: dict[str, Any]
    layer_filter: str | None = None
    verify: dict[str, Any] | None = None
    checkpoint: dict[str, Any] | None = None
    plot: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "pack": str(self.path),
            **self.header,
            "layer_filter": self.layer_filter,
            "layers": self.layers,
            "totals": self.totals,
            "verify": self.verify,
            "checkpoint": self.checkpoint,
            "plot": self.plot,
        }


def act_mode(a_bits: int, recorded: str | None) -> str:
    """'none' at 16 bits, else the manifest's mode ('dynamic' or 'static')."""
    return "none" if a_bits >= 16 or recorded == "none" else str(recorded or "dynamic")


def activation_label(mode: str, has_scale: bool, percentile: float | None = None) -> str:
    """The same words `status(model)` uses for a live layer (runtime.status.act_status)."""
    if mode != "static":
        return mode
    if not has_scale:
        return "static (uncalibrated)"
    return "static (calibrated" + (f", p{percentile:g})" if percentile is not None else ")")


def is_smoothed(transform: dict[str, Any], fields: Any) -> bool:
    """A calibrated pack folds smoothing into `in1` (diag(1/s) R1): not orthogonal by design."""
    smoothed = transform.get("smoothed", transform.get("calibrated", False))
    return "in1" in fields and bool(smoothed)


def _ortho(info: dict[str, Any], tensors: Any, smoothed: bool) -> float | None:
    """Worst |RR^T - I| over the transforms meant to be orthogonal (a smoothed in1 is not);
    None when the layer has none, or the pack did not record it."""
    fields = [f for f in ("in1", "in2", "out") if f in tensors and not (f == "in1" and smoothed)]
    if not fields:
        return None
    if all(f"ortho_error_{f}" in info for f in fields):
        return max(info[f"ortho_error_{f}"] for f in fields)
    return None if smoothed else info.get("ortho_error")  # older packs: one number for all


def _ref_bytes(ref: dict[str, Any]) -> int:
    return prod(int(s) for s in ref["shape"]) * DTYPE_BYTES[ref["dtype"]]


def layer_row(d: dict[str, Any], where: str | Path = MANIFEST) -> dict[str, Any]:
    """One manifest layer as an inspect row (keys: LAYER_SCHEMA); `where` names the manifest
    in errors."""
    try:
        return _layer_row(d)
    except (KeyError, TypeError, ValueError, AttributeError, ConfigError) as exc:
        raise PackError(
            f"{where}: entry for layer {d.get('name', '?')!r} is malformed ({exc!r})"
        ) from None


def _layer_row(d: dict[str, Any]) -> dict[str, Any]:
    out_f, in_f = int(d["out_features"]), int(d["in_features"])
    prec = Precision.parse(d["precision"])
    tensors: dict[str, Any] = d["tensors"]
    transform: dict[str, Any] = d["transform"]
    quant: dict[str, Any] = d["quant"]
    info: dict[str, Any] = d.get("info") or {}
    source: dict[str, Any] = d.get("source") or {}
    smoothed = is_smoothed(transform, tensors)
    fields = {f: [int(s) for s in t["shape"]] for f, t in tensors.items()}
    row_rot = str(transform.get("row_rot", "off"))
    has_bias = "bias" in tensors or bool(source.get("bias"))
    qweight = tensors.get("qweight")
    mode = act_mode(prec.a_bits, quant.get("act_mode"))
    calibrated = mode == "static" and "act_scale" in tensors

    entry = LayerEntry.from_json(d)

    def runtime(requested: str, dtype: str) -> int:
        backend = choose(requested, "cpu", entry, dtype)[0]
        return layer_bytes(
            out_f,
            in_f,
            fields,
            a_bits=prec.a_bits,
            row_rot=row_rot,
            has_bias=has_bias,
            dtype=dtype,
            backend=backend,
            rotation=str(transform.get("rotation", "none")),
        )

    return {
        "name": str(d["name"]),
        "shape": [out_f, in_f],
        "params": out_f * in_f,
        "precision": str(prec),
        "w_bits": prec.w_bits,
        "a_bits": prec.a_bits,
        "block": transform.get("block"),
        "block_out": transform.get("block_out"),
        "permute": "perm" in tensors,
        "rotation": str(transform.get("rotation", "none")),
        "smoothed": smoothed,
        "row_rot": row_rot,
        "activations": activation_label(mode, calibrated, quant.get("act_percentile")),
        "act_mode": mode,
        "act_calibrated": calibrated,
        "weight_scheme": quant.get("weight_scheme") if prec.quantize_weight else None,
        "group_size": quant.get("group_size") if prec.quantize_weight else None,
        "weight_codes": qweight is not None,
        "code_bytes": _ref_bytes(qweight) if qweight is not None else None,
        "pack_bytes": sum(_ref_bytes(t) for t in tensors.values()),
        "source_dtype": source.get("dtype"),
        "weight_rel_error": info.get("weight_rel_error"),
        "ortho_error": _ortho(info, tensors, smoothed),
        "scale_min": info.get("scale_min"),
        "scale_median": info.get("scale_median"),
        "scale_max": info.get("scale_max"),
        "runtime_bytes": {
            b: {dt: runtime(b, dt) for dt in RUNTIME_DTYPES} for b in RUNTIME_BACKENDS
        },
    }


def totals(rows: list[dict[str, Any]], pack_bytes: int) -> dict[str, Any]:
    """Sums over `rows`; `pack_bytes` is the whole pack on disk (shards and manifest)."""
    params = sum(r["params"] for r in rows)
    tensor_bytes = sum(r["pack_bytes"] for r in rows)
    return {
        "layers": len(rows),
        "params": params,
        "tensor_bytes": tensor_bytes,
        "pack_bytes": pack_bytes,
        "fp16_bytes": 2 * params,
        "fp32_bytes": 4 * params,
        "size_vs_fp16": tensor_bytes / (2 * params) if params else None,
        "size_vs_fp32": tensor_bytes / (4 * params) if params else None,
        "runtime_bytes": {
            b: {dt: sum(r["runtime_bytes"][b][dt] for r in rows) for dt in RUNTIME_DTYPES}
            for b in RUNTIME_BACKENDS
        },
    }


def select(names: list[str], layer: str | None) -> list[str]:
    """Names matching the `--layer` regex (all without one); an error if none does."""
    if layer is None:
        return names
    pattern = compile_regex(layer, "--layer")
    chosen = [n for n in names if pattern.search(n)]
    if not chosen:
        raise ConfigError(f"--layer {layer!r} matches none of the pack's {len(names)} layers")
    return chosen


def inspect_pack(pack_dir: str | Path, *, layer: str | None = None) -> PackReport:
    """Describe a pack from its manifest alone: no tensor is read, torch is not imported.

    Args:
        pack_dir: a pack folder written by `duquant pack`.
        layer: only layers whose name matches this regex (totals cover them only).

    Returns:
        A PackReport; `to_json()` is the `duquant inspect --json` document (see SCHEMA).

    Example:
        >>> report = inspect_pack("packs/model-w4a8-b16")  # doctest: +SKIP
        >>> report.totals["size_vs_fp16"]  # doctest: +SKIP
        0.27
    """
    path = Path(pack_dir)
    manifest = read_manifest(path)
    by_name = {str(d.get("name")): d for d in manifest["layers"]}
    names = select(list(by_name), layer)
    rows = [layer_row(by_name[n], path / MANIFEST) for n in names]
    files = manifest.get("files") or []
    on_disk = sum(int(f.get("bytes", 0)) for f in files) + (path / MANIFEST).stat().st_size
    header = {
        "format": manifest["format"],
        "format_version": manifest["format_version"],
        "tool": manifest.get("tool"),
        "torch_version": manifest.get("torch_version"),
        "created": manifest.get("created"),
        "source": manifest.get("source"),
        "selection": manifest.get("selection"),
        "calibration": manifest.get("calibration"),
        "config": manifest["config"],
    }
    return PackReport(path, header, rows, totals(rows, on_disk), layer_filter=layer)


def layer_names(pack_dir: str | Path, layer: str | None = None) -> list[str]:
    """The pack's layer names (in manifest order) that `layer` selects."""
    return select([str(d.get("name")) for d in read_manifest(pack_dir)["layers"]], layer)
