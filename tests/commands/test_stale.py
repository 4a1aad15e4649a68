"""`duquant inspect --checkpoint`: exactly the layers whose source weights changed are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from duquant_cli.commands.inspect import SCHEMA
from duquant_cli.commands.pack import pack
from duquant_cli.commands.stale import check_source
from tests.commands.kinds import copy_pack, edit_manifest, run
from tests.commands.schema_check import validate
from tests.helpers import SMALL_LINEARS, small_state, write_safetensors

Q, DOWN, UP = SMALL_LINEARS


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("stale")
    ckpt = write_safetensors(root / "ckpt.safetensors", small_state())
    return ckpt, pack(ckpt, root / "pack").out


def test_unchanged_checkpoint_is_fresh(packed: tuple[Path, Path]) -> None:
    ckpt, p = packed
    result = check_source(p, ckpt)
    assert result.ok and result.checked == 3
    assert (result.stale, result.missing, result.unrecorded) == ([], [], [])
    res = run("inspect", p, "--checkpoint", ckpt)
    assert res.exit_code == 0, res.output
    assert "checkpoint: all 3 layers match" in res.stdout


def test_changed_layers_are_named_exactly(packed: tuple[Path, Path], tmp_path: Path) -> None:
    _, p = packed
    state = small_state()
    state[f"{Q}.weight"][0, 0] += 1e-3  # one value of one layer
    state[f"{DOWN}.weight"] = state[f"{DOWN}.weight"] * 1.5
    state[f"{UP}.bias"] += 1.0  # biases are not hashed: not a weight change
    ckpt = write_safetensors(tmp_path / "changed.safetensors", state)
    assert check_source(p, ckpt).stale == [Q, DOWN]
    res = run("inspect", p, "--checkpoint", ckpt)
    assert res.exit_code == 1
    assert "2 stale layer(s): layers.0.attn.q_proj, layers.0.mlp.down" in res.stderr
    assert UP not in res.stderr
    assert f"checkpoint stale: {Q}" in res.stdout and f"checkpoint stale: {UP}" not in res.stdout
    doc = json.loads(run("inspect", p, "--checkpoint", ckpt, "--json").stdout)
    validate(doc, SCHEMA)
    assert doc["checkpoint"]["stale"] == [Q, DOWN] and doc["checkpoint"]["ok"] is False


def test_missing_key(packed: tuple[Path, Path], tmp_path: Path) -> None:
    _, p = packed
    state = small_state()
    del state[f"{UP}.weight"]
    ckpt = write_safetensors(tmp_path / "less.safetensors", state)
    result = check_source(p, ckpt)
    assert (result.stale, result.missing) == ([], [UP])
    res = run("inspect", p, "--checkpoint", ckpt)
    assert res.exit_code == 1 and f"1 missing layer(s): {UP}" in res.stderr


def test_dtype_change_without_value_change_is_fresh(tmp_path: Path) -> None:
    bf16 = small_state(torch.bfloat16)
    src = write_safetensors(tmp_path / "bf16.safetensors", bf16)
    p = pack(src, tmp_path / "pack").out
    upcast = write_safetensors(
        tmp_path / "fp32.safetensors",
        {k: v.float() if v.is_floating_point() else v for k, v in bf16.items()},
    )
    assert check_source(p, upcast).ok  # exact upcast: same values
    changed = {k: v.float() if v.is_floating_point() else v for k, v in bf16.items()}
    changed[f"{UP}.weight"][1, 1] += 1e-4  # below bf16 resolution at this size? not for fp32
    changed[f"{DOWN}.weight"][2, 2] += 0.5
    result = check_source(p, write_safetensors(tmp_path / "chg.safetensors", changed))
    assert DOWN in result.stale and Q not in result.stale


def test_unrecorded_and_filter(packed: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, src = packed
    p = copy_pack(src, tmp_path / "p")
    edit_manifest(p, lambda m: m["layers"][2]["source"].pop("sha256"))
    result = check_source(p, ckpt)
    assert result.unrecorded == [UP] and not result.ok
    assert check_source(p, ckpt, layer="attn").ok
    res = run("inspect", p, "--checkpoint", ckpt, "--layer", "mlp")
    assert res.exit_code == 1 and f"1 unrecorded layer(s): {UP}" in res.stderr


def test_bad_checkpoint(packed: tuple[Path, Path], tmp_path: Path) -> None:
    _, p = packed
    res = run("inspect", p, "--checkpoint", tmp_path / "none.safetensors")
    assert res.exit_code == 1 and "none.safetensors: no such file or folder" in res.stderr
