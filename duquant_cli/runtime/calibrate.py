"""Static per-channel activation scales, calibrated explicitly instead of over hidden forwards."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from duquant_cli.errors import ConfigError, MismatchError, PackError
from duquant_cli.formats.pack import MANIFEST, Pack, write_shard
from duquant_cli.runtime.layer import ACT_NONE, ACT_SCALE_MIN, ACT_STATIC, DuQuantLinear

_SHARD_NUMBER = re.compile(r"^tensors-(\d{5})\.safetensors$")


def percentile_rank(percentile: float, n: int) -> int:
    """The 1-based rank of the nearest-rank percentile of n values: ceil(p/100 * n) in [1, n]."""
    return min(n, max(1, math.ceil(round(percentile * n / 100.0, 9))))


class _PercentileObserver:
    """Per input channel, the max over batches of each batch's nearest-rank |x| percentile
    (over the batch's tokens)."""

    def __init__(self, percentile: float) -> None:
        self.percentile = percentile
        self.value: torch.Tensor | None = None

    def __call__(self, layer: DuQuantLinear, x: torch.Tensor) -> None:
        if x.shape[0] == 0:
            return
        a = x.detach().abs().float()
        p = a.kthvalue(percentile_rank(self.percentile, a.shape[0]), dim=0).values
        self.value = p if self.value is None else torch.maximum(self.value, p)


@contextlib.contextmanager
def calibrating(model: nn.Module, percentile: float = 99.9) -> Iterator[list[str]]:
    """Within the block, DuQuant layers with quantized activations run unquantized and record
    the |x| percentile per transformed input channel; on a normal exit each one that saw a batch
    gets static scales `percentile / qmax` (floored at ACT_SCALE_MIN) and quantizes with them.
    The yielded list is filled with the calibrated layer names on exit. If the block raises,
    every layer is left as it was. Calibrate in eager mode (the observer is Python).

    Example:
        >>> with calibrating(model) as names:  # doctest: +SKIP
        ...     for batch in batches:
        ...         model(batch)
        >>> save_act_scales(model, "packs/model-w4a8-b16")  # doctest: +SKIP
    """
    if not 0.0 < percentile <= 100.0:
        raise ConfigError(f"percentile must be in (0, 100], got {percentile}")
    layers = {
        n: m for n, m in model.named_modules() if isinstance(m, DuQuantLinear) and m.a_bits < 16
    }
    if not layers:
        raise ConfigError(
            f"{type(model).__name__} has no DuQuant layers with quantized activations "
            "(load a pack with load_packed first)"
        )
    for m in layers.values():
        m.check_static_ok()
    saved = {m: m.act_mode for m in layers.values()}
    for m in layers.values():
        m.observer, m.act_mode = _PercentileObserver(percentile), ACT_NONE
    calibrated: list[str] = []
    try:
        yield calibrated
    except BaseException:
        for m, mode in saved.items():
            m.observer, m.act_mode = None, mode
        raise
    for name, m in layers.items():
        obs, m.observer = m.observer, None
        if obs.value is None:  # never ran: keep what it had
            m.act_mode = saved[m]
            continue
        qmax = (1 << (m.a_bits - 1)) - 1
        scale = (obs.value / qmax).clamp_min(ACT_SCALE_MIN)
        m.act_scale = scale.to(device=m.weight.device, dtype=torch.float32)  # FLOAT32_FIELDS
        m.act_mode, m.calibrated, m.act_percentile = ACT_STATIC, True, percentile
        calibrated.append(name)


def _next_shard(files: list[dict]) -> str:
    numbers = [int(m.group(1)) for f in files if (m := _SHARD_NUMBER.match(str(f.get("name"))))]
    return f"tensors-{max(numbers, default=0) + 1:05d}.safetensors"


def save_act_scales(model: nn.Module, pack_dir: str | Path) -> list[str]:
    """Write the model's calibrated static scales into the pack it was loaded from.

    Layers are matched by the pack name each DuQuant layer keeps (so any `prefix` given to
    `load_packed` is already accounted for). The scales go into a new shard; the manifest is
    rewritten through a temporary file; a shard of older scales that nothing references any
    more is removed. Returns the pack names written.

    Example:
        >>> save_act_scales(model, "packs/model-w4a8-b16")  # doctest: +SKIP
        ['encoder.layer.0.attention.self.query', ...]
    """
    pack = Pack.open(pack_dir)
    scales: dict[str, tuple[torch.Tensor, float | None]] = {}
    for m in model.modules():
        if isinstance(m, DuQuantLinear) and m.calibrated and m.act_scale is not None:
            entry = pack.layers.get(m.name)
            if entry is None:
                continue
            if m.act_scale.shape != (entry.in_features,):
                raise MismatchError(
                    f"{m.name}: act_scale has {m.act_scale.numel()} channels, the pack's layer "
                    f"{entry.in_features}"
                )
            scales[m.name] = (m.act_scale.detach().float().cpu(), m.act_percentile)
    if not scales:
        raise PackError(f"{pack.path}: no calibrated DuQuant layer of this pack in the model")
    manifest = pack.manifest
    shard = _next_shard(manifest["files"])
    tensors = {f"{n}.act_scale": s for n, (s, _) in scales.items()}
    record = write_shard(pack.path / shard, tensors)
    for entry in manifest["layers"]:
        if entry["name"] in scales:
            entry["tensors"]["act_scale"] = {
                "key": f"{entry['name']}.act_scale",
                "shape": [entry["in_features"]],
                "dtype": "float32",
                "file": shard,
            }
            entry["quant"]["act_mode"] = "static"
            entry["quant"]["act_percentile"] = scales[entry["name"]][1]
    used = {e["file"] for e in manifest["layers"]} | {
        t["file"] for e in manifest["layers"] for t in e["tensors"].values() if t.get("file")
    }
    dropped = [f["name"] for f in manifest["files"] if f["name"] not in used]
    manifest["files"] = [f for f in manifest["files"] if f["name"] in used] + [record]
    Pack(pack.path, manifest)  # the new manifest must read back before it replaces the old one
    tmp = pack.path / f".{MANIFEST}.tmp"
    try:
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(tmp, pack.path / MANIFEST)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        (pack.path / shard).unlink(missing_ok=True)
        raise PackError(f"{pack.path}: could not update the manifest ({exc})") from None
    for name in dropped:
        (pack.path / name).unlink(missing_ok=True)
    return list(scales)
