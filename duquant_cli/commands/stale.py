"""`inspect --checkpoint`: which packed layers no longer match the checkpoint they came from.

Each layer records the SHA-256 of its source weight's bytes at pack time; a layer is stale when
the checkpoint's tensor under the same key hashes differently now.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from duquant_cli.commands.inspect import select
from duquant_cli.formats.checkpoint import open_checkpoint, tensor_sha256
from duquant_cli.formats.pack import Pack


@dataclass
class SourceCheck:
    """stale: weights changed since packing; missing: the source key is gone from the
    checkpoint; unrecorded: the pack holds no hash to compare with."""

    path: Path
    checked: int = 0
    stale: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unrecorded: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.stale or self.missing or self.unrecorded)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "ok": self.ok,
            "checked": self.checked,
            "stale": self.stale,
            "missing": self.missing,
            "unrecorded": self.unrecorded,
        }


def _source_dtype(name: str | None) -> torch.dtype | None:
    dtype = getattr(torch, name, None) if name else None
    return dtype if isinstance(dtype, torch.dtype) else None


def check_source(
    pack_dir: str | Path, checkpoint: str | Path, *, layer: str | None = None
) -> SourceCheck:
    """Compare each selected layer's recorded source hash with `checkpoint`'s tensor.

    A tensor now stored in another dtype is cast back to the recorded one first: bf16 weights
    re-saved as fp32 are not stale (the cast back is exact); any changed value is.

    Args:
        pack_dir: a pack folder.
        checkpoint: what `duquant pack` accepts (file, folder, index, .bin/.pt).
        layer: only layers whose name matches this regex.

    Returns:
        A SourceCheck; `ok` is False when any layer is stale, missing or unrecorded.

    Example:
        >>> check_source("packs/m", "model.safetensors").stale  # doctest: +SKIP
        ['layers.0.mlp.up']
    """
    pack = Pack.open(pack_dir)
    result = SourceCheck(Path(checkpoint))
    with open_checkpoint(checkpoint) as ckpt:
        keys = set(ckpt.keys())
        for name in select(list(pack.layers), layer):
            src = pack.layers[name].source
            key, recorded = src.get("key"), src.get("sha256")
            result.checked += 1
            if not recorded:
                result.unrecorded.append(name)
            elif key not in keys:
                result.missing.append(name)
            else:
                t = ckpt.tensor(key)
                dtype = _source_dtype(src.get("dtype"))
                if dtype is not None and t.dtype != dtype:
                    t = t.to(dtype)
                if tensor_sha256(t) != recorded:
                    result.stale.append(name)
                del t
    return result
