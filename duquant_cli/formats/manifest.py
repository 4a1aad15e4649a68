"""A pack's manifest: its JSON checks and per-layer records, without torch.

torch's start-up alone takes seconds, so `duquant inspect` answers from this module and leaves
the tensors (and torch) to `Pack` in formats/pack.py, which parses manifests with it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from duquant_cli.config import Precision, QuantConfig
from duquant_cli.errors import ConfigError, PackError

FORMAT = "duquant-pack"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_NAME = re.compile(r"^tensors-\d{5}\.safetensors$")
ITEMSIZE = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "uint8": 1,
    "int8": 1,
}
# Bounds on what a manifest may claim, checked before anything is read or allocated: a hostile
# or corrupted pack is refused with a message rather than tried.
MAX_MANIFEST_BYTES = 256 << 20
MAX_LAYERS = 1_000_000
MAX_TENSORS = 64  # per layer; the format defines 13 fields
MAX_NDIM = 8
MAX_DIM = 1 << 40
MAX_FEATURES = (1 << 31) - 1
# Dimensions of each tensor field docs/pack-format.md defines (fields it does not: any).
FIELD_NDIM = {
    **dict.fromkeys(("perm", "bias", "act_scale"), 1),
    **dict.fromkeys(("in1_tail", "in2_tail", "out_tail", "qweight", "scale", "zero", "weight"), 2),
    **dict.fromkeys(("in1", "in2", "out"), 3),
}


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the pack at `path`, with the checks `Pack.open` makes before parsing
    layers: the format, its version, the config, a list of uniquely named layer objects."""
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise PackError(f"{path}: no such pack folder")
    try:
        size = mpath.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise PackError(f"{mpath}: {size} bytes, more than any manifest (corrupt?)")
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PackError(f"{mpath}: missing; not a duquant pack") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PackError(f"{mpath}: not valid JSON ({msg})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PackError(f"{mpath}: not a duquant pack manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise PackError(f"{mpath}: format_version missing or not an integer")
    if version > FORMAT_VERSION:
        raise PackError(
            f"{path}: pack format version {version} is newer than this duquant reads "
            f"({FORMAT_VERSION}); upgrade duquant"
        )
    try:
        QuantConfig.from_json(manifest["config"])
    except (KeyError, ConfigError) as exc:
        raise PackError(f"{mpath}: invalid config ({exc})") from None
    layers = manifest.get("layers")
    if not isinstance(layers, list) or not all(isinstance(d, dict) for d in layers):
        raise PackError(f"{mpath}: 'layers' must be a list of JSON objects")
    if len(layers) > MAX_LAYERS:
        raise PackError(f"{mpath}: {len(layers)} layers, more than {MAX_LAYERS} (corrupt?)")
    seen: set[str] = set()
    for d in layers:
        name = d.get("name")
        if not isinstance(name, str):
            raise PackError(f"{mpath}: a layer's 'name' is {name!r}, not a string")
        if name in seen:
            raise PackError(f"{mpath}: layer {name!r} listed twice")
        seen.add(name)
    file_sizes(manifest, mpath)
    return manifest


def file_sizes(manifest: dict[str, Any], where: str | Path = MANIFEST) -> dict[str, int]:
    """The manifest's `files` as {shard name: bytes}, each record checked (an absent list is
    empty): names are shard names, sizes non-negative integers, checksums strings."""
    files = manifest.get("files", [])
    if not isinstance(files, list):
        raise PackError(f"{where}: 'files' must be a list")
    sizes: dict[str, int] = {}
    for f in files:
        name = f.get("name") if isinstance(f, dict) else None
        size = f.get("bytes") if isinstance(f, dict) else None
        ok = isinstance(name, str) and SHARD_NAME.match(name) and name not in sizes
        ok = ok and isinstance(size, int) and not isinstance(size, bool) and size >= 0
        if not ok or not isinstance(f.get("sha256", ""), str):
            raise PackError(f"{where}: bad 'files' record {_short(f)}")
        sizes[name] = size
    return sizes


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class TensorRef:
    """Where one field of a layer lives: its key in the layer's shard, shape and dtype."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    file: str | None = None  # None: the layer's own file

    def to_json(self) -> dict[str, Any]:
        d = {"key": self.key, "shape": list(self.shape), "dtype": self.dtype}
        return d | ({"file": self.file} if self.file else {})

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class LayerEntry:
    """A packed layer as the manifest records it (see docs/pack-format.md for every key)."""

    name: str
    out_features: int
    in_features: int
    precision: Precision
    transform: dict[str, Any]
    quant: dict[str, Any]
    file: str
    tensors: dict[str, TensorRef]
    source: dict[str, Any]
    info: dict[str, float] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "out_features": self.out_features,
            "in_features": self.in_features,
            "precision": str(self.precision),
            "transform": self.transform,
            "quant": self.quant,
            "file": self.file,
            "tensors": {f: t.to_json() for f, t in self.tensors.items()},
            "source": self.source,
            "info": self.info,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LayerEntry:
        """Parse one layer record; every value a reader relies on must have its JSON type
        (no coercion: `"12"` is not 12), and counts and sizes are bounded."""
        try:
            if not isinstance(d, dict):
                raise TypeError("not a JSON object")
            raw = _typed(d, "tensors", dict)
            if len(raw) > MAX_TENSORS:
                raise ValueError(f"{len(raw)} tensors, more than {MAX_TENSORS}")
            tensors = {f: _tensor_ref(f, t) for f, t in raw.items()}
            entry = cls(
                name=_typed(d, "name", str),
                out_features=_features(d, "out_features"),
                in_features=_features(d, "in_features"),
                precision=Precision.parse(_typed(d, "precision", str)),
                transform=_typed(d, "transform", dict),
                quant=_typed(d, "quant", dict),
                file=_typed(d, "file", str),
                tensors=tensors,
                source=_typed(d, "source", dict),
                info=_typed(d, "info", dict) if "info" in d else {},
            )
            _check_known(entry.transform, _TRANSFORM_KEYS, "transform")
            _check_known(entry.quant, _QUANT_KEYS, "quant")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            name = d.get("name", "?") if isinstance(d, dict) else "?"
            raise PackError(
                f"manifest entry for layer {_short(name)} is malformed ({_short(exc, 160)})"
            ) from None
        if not SHARD_NAME.match(entry.file):
            raise PackError(f"layer {entry.name!r}: bad tensor file name {entry.file!r}")
        for f, t in tensors.items():
            if t.file is not None and not SHARD_NAME.match(t.file):
                raise PackError(f"layer {entry.name!r}: bad tensor file name {t.file!r}")
            if t.dtype not in ITEMSIZE or any(s < 0 or s > MAX_DIM for s in t.shape):
                raise PackError(f"layer {entry.name!r}: bad dtype or shape for tensor {f!r}")
            if len(t.shape) != FIELD_NDIM.get(f, len(t.shape)):
                raise PackError(
                    f"layer {entry.name!r}: tensor {f!r} has shape {list(t.shape)}, "
                    f"not {FIELD_NDIM[f]}-D"
                )
        return entry


def _typed(d: dict[str, Any], key: str, kind: type) -> Any:
    value = d[key]
    if not isinstance(value, kind):
        raise TypeError(f"{key!r} is {_short(value, 40)}, not a {_JSON_NAMES[kind]}")
    return dict(value) if kind is dict else value


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _features(d: dict[str, Any], key: str) -> int:
    value = d[key]
    if not _int(value) or not 1 <= value <= MAX_FEATURES:
        raise ValueError(f"{key!r} is {_short(value, 40)}, not a positive integer")
    return value


def _tensor_ref(field: Any, t: Any) -> TensorRef:
    if not isinstance(t, dict):
        raise TypeError(f"tensor {field!r} is not a JSON object")
    shape = _typed(t, "shape", list)
    if len(shape) > MAX_NDIM or not all(_int(s) for s in shape):
        raise ValueError(f"tensor {field!r} has shape {_short(shape, 40)}")
    file = t.get("file")
    if file is not None and not isinstance(file, str):
        raise TypeError(f"tensor {field!r} has file {_short(file, 40)}")
    return TensorRef(_typed(t, "key", str), tuple(shape), _typed(t, "dtype", str), file or None)


def _opt_pos_int(v: Any) -> bool:
    return v is None or (_int(v) and v >= 1)


def _number(v: Any) -> bool:
    return _int(v) or isinstance(v, float)


# The transform and quant keys readers act on, with what each must be; others are kept as-is.
_TRANSFORM_KEYS = {
    "block": _opt_pos_int,
    "block_out": _opt_pos_int,
    "permute": lambda v: isinstance(v, bool),
    "calibrated": lambda v: isinstance(v, bool),
    "smoothed": lambda v: isinstance(v, bool),
    "rotation": lambda v: isinstance(v, str),
    "row_rot": lambda v: v in ("restore", "propagate", "off"),
    "alpha": _number,
    "rot_steps": _int,
}
_QUANT_KEYS = {
    "w_bits": _int,
    "a_bits": _int,
    "group_size": _opt_pos_int,
    "weight_scheme": lambda v: v in ("sym", "asym"),
    "act_scheme": lambda v: v in ("sym", "asym"),
    "act_clip": lambda v: _number(v) and 0.0 < v <= 1.0,
    "act_mode": lambda v: v in ("dynamic", "static", "none"),
    "act_percentile": lambda v: v is None or _number(v),
    "clip_search": lambda v: isinstance(v, bool),
}
_JSON_NAMES = {dict: "JSON object", list: "JSON list", str: "string"}


def _check_known(record: dict[str, Any], checks: dict[str, Any], what: str) -> None:
    for key, ok in checks.items():
        if key in record and not ok(record[key]):
            raise ValueError(f"{what}.{key} is {_short(record[key], 40)}")
