"""Quantization configuration: one frozen dataclass, validated once, round-tripped through JSON."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from duquant_cli.errors import ConfigError

WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8, 16)
ACT_BITS = (4, 5, 6, 7, 8, 16)


class Rotation(str, Enum):
    """How block rotations are built."""

    HADAMARD = "hadamard"  # data-free: Walsh-Hadamard (DCT for non powers of two), random signs
    SVD = "svd"  # data-free: eigenbasis of each weight block's Gram matrix (earlier openpi variant)
    GREEDY = "greedy"  # activation-aware: DuQuant's greedy outlier-spreading rotation
    NONE = "none"  # permutation only


class RowRot(str, Enum):
    """What happens to output rows: rotated and restored after the matmul, left rotated, or none."""

    RESTORE = "restore"
    PROPAGATE = "propagate"
    OFF = "off"


class Scheme(str, Enum):
    SYM = "sym"
    ASYM = "asym"


@dataclass(frozen=True)
class Precision:
    """Weight and activation bit widths; 16 means kept in floating point."""

    w_bits: int
    a_bits: int

    def __post_init__(self) -> None:
        if self.w_bits not in WEIGHT_BITS:
            raise ConfigError(f"weight bits must be 2-8 or 16, got {self.w_bits}")
        if self.a_bits not in ACT_BITS:
            raise ConfigError(f"activation bits must be 4-8 or 16, got {self.a_bits}")

    @classmethod
    def parse(cls, text: str) -> Precision:
        m = re.fullmatch(r"w(\d+)a(\d+)", text.strip().lower())
        if not m:
            raise ConfigError(
                f"invalid precision {text!r}: expected wXaY such as w4a8, w8a8, w4a16 or w16a16"
            )
        return cls(int(m.group(1)), int(m.group(2)))

    @property
    def quantize_weight(self) -> bool:
        return self.w_bits < 16

    @property
    def quantize_act(self) -> bool:
        return self.a_bits < 16

    def __str__(self) -> str:
        return f"w{self.w_bits}a{self.a_bits}"


@dataclass(frozen=True)
class QuantConfig:
    """Everything that decides what a pack holds; stored whole in the manifest.

    Args:
        precision: default precision ("w4a8"); `layer_bits` overrides it per layer regex.
        block: input block size B of the block transforms.
        block_out: output (row) block size; defaults to `block`.
        permute: zigzag permutation between the block transforms.
        smooth_lambda: data-free zigzag scores weight energy as (1-l)*e + l*mean(e).
        rotation: how block rotations are built (see `Rotation`).
        row_rot: output row rotation mode (see `RowRot`).
        group_size: weight quantization group along the input dim; None = per output channel.
        weight_scheme: symmetric (MSE-searched clip when `clip_search`) or asymmetric.
        act_scheme / act_clip: per-token activation quantization, symmetric or asymmetric,
            with the token range scaled by `act_clip`.
        alpha: smoothing exponent s = amax^a / wmax^(1-a) (calibrated packs only).
        rot_steps: greedy rotation steps, the best prefix kept (calibrated packs only).
        gptq: error-compensating weight rounding (GPTQ) against the calibration rows
            (calibrated packs only).
        seed: seeds every random choice, so packs are reproducible.
    """

    precision: Precision = field(default_factory=lambda: Precision(4, 8))
    layer_bits: tuple[tuple[str, Precision], ...] = ()
    block: int = 16
    block_out: int | None = None
    permute: bool = True
    smooth_lambda: float = 0.15
    rotation: Rotation = Rotation.HADAMARD
    row_rot: RowRot = RowRot.RESTORE
    group_size: int | None = None
    weight_scheme: Scheme = Scheme.SYM
    clip_search: bool = True
    act_scheme: Scheme = Scheme.SYM
    act_clip: float = 1.0
    calibrated: bool = False
    alpha: float = 0.5
    rot_steps: int = 256
    gptq: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.block < 1:
            raise ConfigError(f"--block must be at least 1, got {self.block}")
        if self.block_out is not None and self.block_out < 1:
            raise ConfigError(f"--block-out must be at least 1, got {self.block_out}")
        if self.group_size is not None and self.group_size < 1:
            raise ConfigError(f"--group-size must be positive, got {self.group_size}")
        if not 0.0 <= self.smooth_lambda <= 1.0:
            raise ConfigError(f"--smooth must be in [0, 1], got {self.smooth_lambda}")
        if not 0.0 < self.act_clip <= 1.0:
            raise ConfigError(f"activation clip must be in (0, 1], got {self.act_clip}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"--alpha must be in [0, 1], got {self.alpha}")
        if self.rot_steps < 0:
            raise ConfigError(f"--rot-steps must be >= 0, got {self.rot_steps}")
        if self.rotation is Rotation.GREEDY and not self.calibrated:
            raise ConfigError("--rotation greedy needs activation statistics (--calib STATS)")
        if self.gptq and not self.calibrated:
            raise ConfigError("--gptq needs activation statistics (--calib STATS)")
        for pattern, _ in self.layer_bits:
            compile_regex(pattern, "--layer-bits")

    @property
    def row_block(self) -> int:
        return self.block_out or self.block

    def precision_for(self, name: str) -> Precision:
        """The last `layer_bits` pattern that matches wins, like later flags overriding earlier."""
        chosen = self.precision
        for pattern, prec in self.layer_bits:
            if re.search(pattern, name):
                chosen = prec
        return chosen

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["precision"] = str(self.precision)
        data["layer_bits"] = [[p, str(prec)] for p, prec in self.layer_bits]
        for key, value in data.items():
            if isinstance(value, Enum):
                data[key] = value.value
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QuantConfig:
        """Decode a manifest's config; unknown keys are refused rather than silently dropped."""
        if not isinstance(data, dict):
            raise ConfigError("config must be a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(sorted(unknown))}")
        kw = dict(data)
        try:
            if "precision" in kw:
                kw["precision"] = Precision.parse(kw["precision"])
            if "layer_bits" in kw:
                kw["layer_bits"] = tuple((str(p), Precision.parse(b)) for p, b in kw["layer_bits"])
            for key, enum in (
                ("rotation", Rotation),
                ("row_rot", RowRot),
                ("weight_scheme", Scheme),
                ("act_scheme", Scheme),
            ):
                if key in kw:
                    kw[key] = enum(kw[key])
            return cls(**kw)
        except (TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"invalid config in manifest: {exc}") from None


def compile_regex(pattern: str, flag: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"invalid regex {pattern!r} for {flag}: {exc}") from None


def parse_layer_bits(items: list[str]) -> tuple[tuple[str, Precision], ...]:
    """Parse repeated `REGEX=wXaY` flags."""
    out = []
    for item in items:
        pattern, sep, bits = item.rpartition("=")
        if not sep or not pattern:
            raise ConfigError(f"invalid --layer-bits {item!r}: expected REGEX=wXaY")
        compile_regex(pattern, "--layer-bits")
        out.append((pattern, Precision.parse(bits)))
    return tuple(out)
