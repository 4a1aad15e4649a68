"""Static per-channel activation scales, calibrated explicitly instead of over hidden forwards."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from duquant_cli.errors import PackError
from duquant_cli.formats.pack import FORMAT, FORMAT_VERSION, MANIFEST, Pack, sha256_file
from duquant_cli.runtime.layer import ACT_STATIC, DuQuantLinear


class _PercentileObserver:
    """Keeps, per input channel, the max over batches of the batch's |x| percentile."""

    def __init__(self, percentile: float) -> None:
        self.percentile = percentile
        self.value: torch.Tensor | None = None

    def __call__(self, layer: DuQuantLinear, x: torch.Tensor) -> None:
        a = x.detach().abs().float()
        k = max(1, min(a.shape[0], round(self.percentile / 100.0 * a.shape[0])))
        p = a.kthvalue(k, dim=0).values
        self.value = p if self.value is None else torch.maximum(self.value, p)


@contextlib.contextmanager
def calibrating(model: nn.Module, percentile: float = 99.9) -> Iterator[list[str]]:
    """Within the block, DuQuant layers run unquantized activations and record their ranges; on
    exit each layer's static per-channel scales are fixed and it quantizes with them.

    Example:
        >>> with calibrating(model):  # doctest: +SKIP
        ...     for batch in batches:
        ...         model(batch)
    """
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, DuQuantLinear)}
    saved = {}
    for m in layers.values():
        saved[m] = m.act_mode
        m.observer, m.act_mode = _PercentileObserver(percentile), "none"
    calibrated: list[str] = []
    try:
        yield calibrated
    finally:
        for name, m in layers.items():
            obs, m.observer = m.observer, None
            if obs.value is None or m.a_bits >= 16:
                m.act_mode = saved[m]
                continue
            qmax = (1 << (m.a_bits - 1)) - 1
            m.act_scale = (obs.value / qmax).clamp_min(1e-8).to(m.weight.dtype)
            m.act_mode, m.calibrated = ACT_STATIC, True
            calibrated.append(name)


def save_act_scales(model: nn.Module, pack_dir: str | Path, prefix: str = "") -> int:
    """Write calibrated static scales back into the pack (a new shard + updated manifest).

    Layers are matched by name (pack name = module name without `prefix`). Returns the count.
    """
    pack = Pack.open(pack_dir)
    scales = {}
    for name, m in model.named_modules():
        if isinstance(m, DuQuantLinear) and m.calibrated and m.act_scale is not None:
            pname = name[len(prefix) :] if name.startswith(prefix) else name
            if pname in pack.layers:
                scales[pname] = m.act_scale.detach().float().cpu()
    if not scales:
        raise PackError(f"{pack_dir}: no calibrated DuQuant layers of this pack in the model")
    manifest = pack.manifest
    shard = f"tensors-{len(manifest['files']) + 1:05d}.safetensors"
    path = pack.path / shard
    tensors = {f"{n}.act_scale": s for n, s in scales.items()}
    save_file(tensors, str(path), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    manifest["files"].append(
        {"name": shard, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    )
    for entry in manifest["layers"]:
        if entry["name"] in scales:
            entry["tensors"]["act_scale"] = {
                "key": f"{entry['name']}.act_scale",
                "shape": [entry["in_features"]],
                "dtype": "float32",
                "file": shard,
            }
            entry["quant"]["act_mode"] = "static"
    tmp = pack.path / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, pack.path / MANIFEST)
    return len(scales)
