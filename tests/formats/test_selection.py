"""Layer selection: default exclusions, include/exclude/scope, per-layer precision."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from duquant_cli.config import Precision, QuantConfig, parse_layer_bits
from duquant_cli.errors import CheckpointError, ConfigError
from duquant_cli.formats.checkpoint import open_checkpoint
from duquant_cli.formats.selection import DEFAULT_EXCLUDE, Selection, select_layers
from tests.helpers import SMALL_LINEARS, small_state, write_safetensors


def _plan(path: Path, sel: Selection | None = None, cfg: QuantConfig | None = None):
    with open_checkpoint(path) as ckpt:
        return select_layers(ckpt, sel or Selection(), cfg or QuantConfig())


def test_default_selection(ckpt_file: Path) -> None:
    plan = _plan(ckpt_file)
    assert [layer.name for layer in plan.layers] == SMALL_LINEARS
    up = plan.layers[2]
    assert up.weight_key == "layers.0.mlp.up.weight"
    assert up.bias_key == "layers.0.mlp.up.bias"
    assert (up.out_features, up.in_features) == (40, 24)
    assert plan.layers[0].bias_key is None
    assert all(layer.precision == Precision(4, 8) for layer in plan.layers)
    assert plan.skipped == []


@pytest.mark.parametrize(
    "name",
    [
        "model.embed_tokens",
        "embeddings.word_embeddings",
        "layers.0.input_layernorm",
        "encoder.layer.0.attention.output.LayerNorm",
        "model.norm",
        "lm_head",
        "transformer.wte",
        "transformer.wpe",
        "gpt_neox.embed_out",
        "classifier",
        "output",
    ],
)
def test_default_exclude_pattern_matches(name: str) -> None:
    assert re.search(DEFAULT_EXCLUDE, name)


@pytest.mark.parametrize(
    "name",
    ["model.layers.0.mlp.down_proj", "encoder.layer.0.attention.output.dense", "pooler.dense"],
)
def test_default_exclude_keeps_linears(name: str) -> None:
    assert not re.search(DEFAULT_EXCLUDE, name)


def test_include_and_exclude(ckpt_file: Path) -> None:
    assert [x.name for x in _plan(ckpt_file, Selection(include=(r"mlp",))).layers] == [
        "layers.0.mlp.down",
        "layers.0.mlp.up",
    ]
    assert [x.name for x in _plan(ckpt_file, Selection(exclude=(r"\.up$", "q_proj"))).layers] == [
        "layers.0.mlp.down"
    ]
    # include + exclude combine; exclude wins
    sel = Selection(include=("mlp", "attn"), exclude=("down",))
    assert [x.name for x in _plan(ckpt_file, sel).layers] == [
        "layers.0.attn.q_proj",
        "layers.0.mlp.up",
    ]


def test_default_exclude_can_be_disabled(ckpt_file: Path) -> None:
    names = [x.name for x in _plan(ckpt_file, Selection(default_exclude=False)).layers]
    assert names == ["embed_tokens", *SMALL_LINEARS, "lm_head"]
    # an explicit include still cannot pick what the default exclusion removes
    assert [x.name for x in _plan(ckpt_file, Selection(include=("lm_head|mlp.up",))).layers] == [
        "layers.0.mlp.up"
    ]


def test_scope(ckpt_file: Path) -> None:
    names = [x.name for x in _plan(ckpt_file, Selection(scope="layers.0.mlp.")).layers]
    assert names == ["layers.0.mlp.down", "layers.0.mlp.up"]


def test_include_reports_non_linear_tensors(tmp_path: Path) -> None:
    state = small_state()
    state["layers.0.conv.weight"] = torch.zeros(4, 3, 3)
    path = write_safetensors(tmp_path / "m.safetensors", state)
    plan = _plan(path, Selection(include=("conv|q_proj",)))
    assert [x.name for x in plan.layers] == ["layers.0.attn.q_proj"]
    assert plan.skipped == [("layers.0.conv.weight", "3-D tensor, not a linear weight")]
    # without --include the conv is silently not a candidate
    assert _plan(path).skipped == []


def test_include_refuses_integer_weight(tmp_path: Path) -> None:
    state = small_state()
    state["layers.0.q.weight"] = torch.zeros(4, 4, dtype=torch.int8)
    path = write_safetensors(tmp_path / "m.safetensors", state)
    assert "layers.0.q" not in [x.name for x in _plan(path).layers]
    with pytest.raises(CheckpointError, match="not a float weight"):
        _plan(path, Selection(include=(r"\.q$",)))


def test_layer_bits_last_match_wins(ckpt_file: Path) -> None:
    cfg = QuantConfig(
        precision=Precision(4, 8),
        layer_bits=parse_layer_bits(["mlp=w8a8", r"down=w3a16", r"mlp\.up=w16a16"]),
    )
    bits = {x.name: str(x.precision) for x in _plan(ckpt_file, cfg=cfg).layers}
    assert bits == {
        "layers.0.attn.q_proj": "w4a8",
        "layers.0.mlp.up": "w16a16",
        "layers.0.mlp.down": "w3a16",
    }
    # order matters: the generic rule last overrides the specific one
    cfg2 = QuantConfig(layer_bits=parse_layer_bits([r"down=w3a16", "mlp=w8a8"]))
    assert cfg2.precision_for("layers.0.mlp.down") == Precision(8, 8)


def test_parse_layer_bits() -> None:
    assert parse_layer_bits(["a=b=w8a8"]) == (("a=b", Precision(8, 8)),)  # last '=' splits
    for bad in ["nobits", "=w4a8", "x=w9a8", "x=abc"]:
        with pytest.raises(ConfigError):
            parse_layer_bits([bad])
    with pytest.raises(ConfigError, match="invalid regex"):
        parse_layer_bits(["(=w4a8"])


@pytest.mark.parametrize(("field", "flag"), [("include", "--include"), ("exclude", "--exclude")])
def test_invalid_regex(field: str, flag: str) -> None:
    with pytest.raises(ConfigError, match=f"invalid regex .* for {flag}"):
        Selection(**{field: ("[unclosed",)})


def test_selecting_nothing(ckpt_file: Path) -> None:
    with pytest.raises(ConfigError, match="no layers selected"):
        _plan(ckpt_file, Selection(include=("does-not-exist",)))
    with pytest.raises(ConfigError, match="no layers selected"):
        _plan(ckpt_file, Selection(scope="decoder."))


def test_group_size_must_divide_selected_layers(ckpt_file: Path) -> None:
    assert len(_plan(ckpt_file, cfg=QuantConfig(group_size=8)).layers) == 3
    with pytest.raises(ConfigError, match=r"mlp\.down: --group-size 12 does not divide 40"):
        _plan(ckpt_file, cfg=QuantConfig(group_size=12))
    # a layer kept in floating point needs no groups
    cfg = QuantConfig(group_size=12, layer_bits=parse_layer_bits(["down=w16a16"]))
    assert len(_plan(ckpt_file, cfg=cfg).layers) == 3
