"""Precision parsing, QuantConfig validation and its JSON round trip."""

from __future__ import annotations

import json

import pytest

from duquant_cli.config import Precision, QuantConfig, Rotation, RowRot, Scheme, parse_layer_bits
from duquant_cli.errors import ConfigError

CONFIGS = [
    QuantConfig(),
    QuantConfig(
        precision=Precision(3, 16),
        layer_bits=parse_layer_bits([r"mlp\.down=w8a8", "attn=w16a16", "a=b=w2a4"]),
        block=12,
        block_out=7,
        permute=False,
        smooth_lambda=0.0,
        rotation=Rotation.SVD,
        row_rot=RowRot.PROPAGATE,
        group_size=32,
        weight_scheme=Scheme.ASYM,
        clip_search=False,
        act_scheme=Scheme.ASYM,
        act_clip=0.9,
        seed=1234,
    ),
    QuantConfig(rotation=Rotation.NONE, row_rot=RowRot.OFF, precision=Precision(16, 16)),
    QuantConfig(
        rotation=Rotation.GREEDY, calibrated=True, alpha=0.75, rot_steps=0, smooth_lambda=1.0
    ),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_json_round_trip(cfg: QuantConfig) -> None:
    data = cfg.to_json()
    text = json.dumps(data)  # plain JSON types only
    assert QuantConfig.from_json(json.loads(text)) == cfg
    assert QuantConfig.from_json(data) == cfg


def test_json_shape() -> None:
    data = CONFIGS[1].to_json()
    assert data["precision"] == "w3a16"
    assert data["layer_bits"] == [[r"mlp\.down", "w8a8"], ["attn", "w16a16"], ["a=b", "w2a4"]]
    assert data["rotation"] == "svd" and data["row_rot"] == "propagate"
    assert data["weight_scheme"] == "asym" and data["block_out"] == 7
    assert set(data) == set(QuantConfig.__dataclass_fields__)


def test_from_json_fills_defaults_and_refuses_unknown_keys() -> None:
    assert QuantConfig.from_json({}) == QuantConfig()
    assert QuantConfig.from_json({"block": 8}) == QuantConfig(block=8)
    with pytest.raises(ConfigError, match="unknown config keys: zzz"):
        QuantConfig.from_json({"block": 8, "zzz": 1})
    with pytest.raises(ConfigError, match="must be a JSON object"):
        QuantConfig.from_json([])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "data",
    [
        {"rotation": "spiral"},
        {"precision": "w9a8"},
        {"precision": 4},
        {"layer_bits": [["x"]]},
        {"block": 0},
        {"seed": 1, "act_clip": 0.0},
    ],
)
def test_from_json_bad_values(data: dict) -> None:
    with pytest.raises(ConfigError):
        QuantConfig.from_json(data)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("w4a8", (4, 8)),
        ("W8A8", (8, 8)),
        (" w4a16 ", (4, 16)),
        ("w16a16", (16, 16)),
        ("w2a4", (2, 4)),
    ],
)
def test_precision_parse(text: str, expected: tuple[int, int]) -> None:
    p = Precision.parse(text)
    assert (p.w_bits, p.a_bits) == expected
    assert str(p) == f"w{expected[0]}a{expected[1]}"
    assert p.quantize_weight == (expected[0] < 16)
    assert p.quantize_act == (expected[1] < 16)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("w9a8", "weight bits must be 2-8 or 16, got 9"),
        ("w1a8", "weight bits must be 2-8 or 16, got 1"),
        ("w4a3", "activation bits must be 4-8 or 16, got 3"),
        ("w4a32", "activation bits must be 4-8 or 16, got 32"),
        ("abc", "invalid precision 'abc'"),
        ("w4", "invalid precision"),
        ("4a8", "invalid precision"),
    ],
)
def test_precision_parse_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Precision.parse(text)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"block": 0}, "--block must be at least 1"),
        ({"block_out": 0}, "--block-out must be at least 1"),
        ({"group_size": 0}, "--group-size must be positive"),
        ({"smooth_lambda": 1.5}, r"--smooth must be in \[0, 1\]"),
        ({"act_clip": 1.5}, r"activation clip must be in \(0, 1\]"),
        ({"alpha": -0.1}, r"--alpha must be in \[0, 1\]"),
        ({"rot_steps": -1}, "--rot-steps must be >= 0"),
        ({"rotation": Rotation.GREEDY}, "--rotation greedy needs activation statistics"),
        ({"layer_bits": (("(", Precision(4, 8)),)}, "invalid regex"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        QuantConfig(**kwargs)


def test_row_block_defaults_to_block() -> None:
    assert QuantConfig(block=12).row_block == 12
    assert QuantConfig(block=12, block_out=5).row_block == 5
