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


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the pack at `path`, with the checks `Pack.open` makes before parsing
    layers: the format, its version, the config, a list of uniquely named layer objects."""
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise PackError(f"{path}: no such pack folder")
    try:
        manifest = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise PackError(f"{mpath}: missing; not a duquant pack") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PackError(f"{mpath}: not valid JSON ({exc})") from None
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
    seen: set[Any] = set()
    for d in layers:
        if d.get("name") in seen:
            raise PackError(f"{mpath}: layer {d.get('name')!r} listed twice")
        seen.add(d.get("name"))
    return manifest


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
        try:
            tensors = {
                str(f): TensorRef(
                    str(t["key"]),
                    tuple(int(s) for s in t["shape"]),
                    str(t["dtype"]),
                    str(t["file"]) if t.get("file") else None,
                )
                for f, t in d["tensors"].items()
            }
            entry = cls(
                name=str(d["name"]),
                out_features=int(d["out_features"]),
                in_features=int(d["in_features"]),
                precision=Precision.parse(d["precision"]),
                transform=dict(d["transform"]),
                quant=dict(d["quant"]),
                file=str(d["file"]),
                tensors=tensors,
                source=dict(d["source"]),
                info=dict(d.get("info", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            name = d.get("name", "?") if isinstance(d, dict) else "?"
            raise PackError(f"manifest entry for layer {name!r} is malformed ({exc})") from None
        if not SHARD_NAME.match(entry.file):
            raise PackError(f"layer {entry.name!r}: bad tensor file name {entry.file!r}")
        for f, t in tensors.items():
            if t.file is not None and not SHARD_NAME.match(t.file):
                raise PackError(f"layer {entry.name!r}: bad tensor file name {t.file!r}")
            if t.dtype not in ITEMSIZE or any(s < 0 for s in t.shape):
                raise PackError(f"layer {entry.name!r}: bad dtype or shape for tensor {f!r}")
        return entry
