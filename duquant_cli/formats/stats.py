"""Calibration statistics: per linear layer, the per-channel max |x| and a sample of input rows.

File layout (safetensors): ``NAME.amax`` float32 [in] for every layer and ``NAME.rows``
float16 or float32 [r, in] for the first layer of each group fed the same input (q/k/v, gate/up);
the header's ``duquant_stats`` metadata is one JSON string::

    {"format_version": 1, "max_rows": 4096, "batches": 2, "source": {...},
     "layers": {NAME: {"in_features": n, "tokens": seen, "rows_of": NAME_HOLDING_THE_ROWS}}}

Layer names are module names, the same names a pack gives its layers.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from duquant_cli.errors import CheckpointError, MismatchError

STATS_FORMAT = "duquant-stats"
STATS_VERSION = 1
_META_KEY = "duquant_stats"


@dataclass(frozen=True)
class LayerStats:
    """amax: float32 [in], max |x| over every row seen; rows: [r, in] a uniform sample of them
    (float16, or float32 where |x| exceeds float16); tokens: how many rows were seen."""

    amax: torch.Tensor
    rows: torch.Tensor
    tokens: int


@dataclass(frozen=True)
class Stats:
    """Statistics per layer name; layers fed the same input share one `rows` tensor."""

    layers: dict[str, LayerStats]
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> LayerStats:
        return self.layers[name]

    def __contains__(self, name: object) -> bool:
        return name in self.layers

    def require(self, name: str, in_features: int, where: str = "stats") -> LayerStats:
        """The layer's statistics, checked to fit a layer with `in_features` inputs."""
        st = self.layers.get(name)
        if st is None:
            raise MismatchError(
                f"{name}: no calibration statistics for this layer in {where}; "
                "calibrate it or leave it out with --exclude"
            )
        if st.amax.shape != (in_features,) or st.rows.shape[1:] != (in_features,):
            raise MismatchError(
                f"{name}: statistics in {where} are for {st.amax.shape[0]} inputs, "
                f"the layer has {in_features}"
            )
        return st

    @property
    def nbytes(self) -> int:
        seen: dict[int, torch.Tensor] = {id(s.rows): s.rows for s in self.layers.values()}
        rows = sum(t.numel() * t.element_size() for t in seen.values())
        return rows + sum(s.amax.numel() * 4 for s in self.layers.values())

    def save(self, path: str | Path) -> Path:
        """Write to `path` (safetensors), through a temporary file renamed into place."""
        path = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        owner: dict[int, str] = {}
        layers: dict[str, dict[str, Any]] = {}
        for name, st in self.layers.items():
            tensors[f"{name}.amax"] = st.amax.float().contiguous()
            holder = owner.setdefault(id(st.rows), name)
            if holder == name:
                tensors[f"{name}.rows"] = st.rows.contiguous()
            layers[name] = {
                "in_features": int(st.amax.shape[0]),
                "tokens": st.tokens,
                "rows_of": holder,
            }
        meta = {"format_version": STATS_VERSION, **self.meta, "layers": layers}
        header = {"format": STATS_FORMAT, _META_KEY: json.dumps(meta)}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
        try:
            save_file(tensors, str(tmp), metadata=header)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Stats:
        """Read a file written by `save`; CheckpointError with a one-line reason otherwise."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such statistics file")
        try:
            with safe_open(str(path), framework="pt") as fh:
                header = fh.metadata() or {}
                if header.get("format") != STATS_FORMAT or _META_KEY not in header:
                    raise CheckpointError(
                        f"{path}: not a duquant statistics file (make one with duquant calibrate)"
                    )
                meta = json.loads(header[_META_KEY])
                version = meta.get("format_version")
                if not isinstance(version, int) or version > STATS_VERSION:
                    raise CheckpointError(
                        f"{path}: statistics format version {version!r} is not one this "
                        f"duquant reads ({STATS_VERSION}); upgrade duquant"
                    )
                entries = meta.pop("layers")
                rows: dict[str, torch.Tensor] = {}
                layers = {}
                for name, e in entries.items():
                    holder = e["rows_of"]
                    if holder not in rows:
                        rows[holder] = fh.get_tensor(f"{holder}.rows")
                    layers[name] = LayerStats(
                        fh.get_tensor(f"{name}.amax"), rows[holder], int(e["tokens"])
                    )
        except (SafetensorError, OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{path}: unreadable statistics file ({exc})") from None
        return cls(layers, meta)
