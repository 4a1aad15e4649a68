"""Which checkpoint tensors become packed layers, and at which precision."""

from __future__ import annotations

import re
from dataclasses import dataclass

from duquant_cli.config import Precision, QuantConfig, compile_regex
from duquant_cli.errors import CheckpointError, ConfigError
from duquant_cli.formats.checkpoint import FLOAT_DTYPES, Checkpoint

# Left out by default: embeddings, norms and the final output head (all 2-D in some models).
DEFAULT_EXCLUDE = r"(?i)(embed|norm|(^|\.)(wte|wpe|lm_head|embed_out|classifier|score)$|^output$)"


@dataclass(frozen=True)
class Selection:
    """Which layers to pack: layer names are checkpoint keys without `.weight`."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    scope: str = ""
    default_exclude: bool = True

    def __post_init__(self) -> None:
        for pattern in self.include:
            compile_regex(pattern, "--include")
        for pattern in self.exclude:
            compile_regex(pattern, "--exclude")


@dataclass(frozen=True)
class PlannedLayer:
    name: str
    weight_key: str
    bias_key: str | None
    out_features: int
    in_features: int
    precision: Precision


@dataclass(frozen=True)
class Plan:
    layers: list[PlannedLayer]
    skipped: list[tuple[str, str]]  # (key, reason) for tensors a user regex matched but can't pack


def select_layers(ckpt: Checkpoint, sel: Selection, cfg: QuantConfig) -> Plan:
    """The layers to pack, in checkpoint order; errors when nothing is selected."""
    keys = ckpt.keys()
    key_set = set(keys)
    excludes = [re.compile(p) for p in sel.exclude]
    if sel.default_exclude:
        excludes.append(re.compile(DEFAULT_EXCLUDE))
    includes = [re.compile(p) for p in sel.include]
    layers: list[PlannedLayer] = []
    skipped: list[tuple[str, str]] = []
    for key in keys:
        if not key.endswith(".weight") or not key.startswith(sel.scope):
            continue
        name = key[: -len(".weight")]
        if includes and not any(p.search(name) for p in includes):
            continue
        if any(p.search(name) for p in excludes):
            continue
        info = ckpt.info(key)
        if len(info.shape) != 2:
            if includes:
                skipped.append((key, f"{len(info.shape)}-D tensor, not a linear weight"))
            continue
        if info.dtype not in FLOAT_DTYPES:
            if includes:
                raise CheckpointError(
                    f"{key}: selected tensor has dtype {info.dtype}, not a float weight; "
                    "narrow --include"
                )
            continue
        out_f, in_f = info.shape
        precision = cfg.precision_for(name)
        if cfg.group_size and precision.quantize_weight and in_f % cfg.group_size:
            raise ConfigError(f"{name}: --group-size {cfg.group_size} does not divide {in_f}")
        bias = name + ".bias"
        layers.append(
            PlannedLayer(name, key, bias if bias in key_set else None, out_f, in_f, precision)
        )
    if not layers:
        raise ConfigError(
            f"no layers selected in {ckpt.path} (check --include/--exclude/--scope; "
            "layers are 2-D float '*.weight' tensors)"
        )
    return Plan(layers, skipped)
