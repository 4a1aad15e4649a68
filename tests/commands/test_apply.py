"""`duquant apply`: every packed layer against its checkpoint layer, without model code."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from duquant_cli.cli import app
from duquant_cli.commands.apply import apply
from duquant_cli.config import Precision, RowRot
from duquant_cli.errors import MismatchError
from duquant_cli.formats.stats import LayerStats, Stats
from tests.helpers import write_safetensors
from tests.runtime.util import LINEARS, W16A16, TinyNet, make_pack, save_model

ANSI = re.compile(r"\x1b\[[0-9;]*m")
ROW_KEYS = {
    "name", "shape", "precision", "rel_error", "sqnr_db", "bytes_fp", "bytes_dq",
    "t_linear_us", "t_dq_us", "tokens", "compared",
}  # fmt: skip


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_table(tmp_path: Path) -> None:
    base = TinyNet()
    out = make_pack(tmp_path, base)
    result = run("apply", tmp_path / "pack.safetensors", out, "--repeats", "2")
    assert result.exit_code == 0, result.output
    text = ANSI.sub("", result.stdout)
    for name in LINEARS:
        assert name in text
    assert "rel err" in text and "SQNR dB" in text and "w4a8" in text
    assert "3 layers on 64 Gaussian rows (seed 0); worst relative error" in text


def test_json_rows(tmp_path: Path) -> None:
    base = TinyNet()
    out = make_pack(tmp_path, base)
    data = _json(run("apply", tmp_path / "pack.safetensors", out, "--json", "--tokens", "32"))
    assert data["device"] == "cpu" and data["dtype"] == "float32"
    rows = {r["name"]: r for r in data["layers"]}
    assert sorted(rows) == sorted(LINEARS)
    for r in rows.values():
        assert set(r) == ROW_KEYS
        assert r["tokens"] == 32 and r["compared"] == "output" and r["precision"] == "w4a8"
        assert 0.01 < r["rel_error"] < 0.2 and r["sqnr_db"] > 10
        assert r["t_linear_us"] > 0 and r["t_dq_us"] > 0
    assert rows["proj"]["shape"] == [24, 40]
    assert rows["proj"]["bytes_fp"] == 4 * (24 * 40 + 24)
    assert data["worst_rel_error"] == max(r["rel_error"] for r in rows.values())


@pytest.mark.parametrize("row_rot", [RowRot.RESTORE, RowRot.PROPAGATE])
def test_unquantized_pack_is_exact(tmp_path: Path, row_rot: RowRot) -> None:
    base = TinyNet()
    out = make_pack(tmp_path, base, precision=W16A16, row_rot=row_rot)
    data = _json(run("apply", tmp_path / "pack.safetensors", out, "--json", "--repeats", "1"))
    for r in data["layers"]:
        assert r["rel_error"] < 1e-6
        assert r["sqnr_db"] is None or r["sqnr_db"] > 110
        want = "rotated output" if row_rot is RowRot.PROPAGATE else "output"
        assert r["compared"] == want


def test_pack_of_another_checkpoint_exits_1_naming_layers(tmp_path: Path) -> None:
    out = make_pack(tmp_path, TinyNet(seed=0))
    other = save_model(TinyNet(seed=1), tmp_path / "other.safetensors")
    result = run("apply", other, out)
    assert result.exit_code == 1
    lines = [ln for ln in ANSI.sub("", result.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and result.stdout.strip() == ""
    assert lines[0].startswith(f"error: {out} was not made from {other}: 3 layer(s): ")
    for name in LINEARS:
        assert f"{name}: weight differs from the one packed" in lines[0]


def test_missing_and_reshaped_source_layers(tmp_path: Path) -> None:
    base = TinyNet()
    out = make_pack(tmp_path, base)
    state = {k: v.detach() for k, v in base.state_dict().items()}
    del state["proj.weight"]
    state["blocks.0.up.weight"] = torch.zeros(56, 41)
    ckpt = write_safetensors(tmp_path / "cut.safetensors", state)
    with pytest.raises(MismatchError, match=r"2 layer\(s\)") as info:
        apply(ckpt, out)
    msg = str(info.value)
    assert "proj: weight not in the checkpoint" in msg
    assert "blocks.0.up: weight differs from the one packed" in msg


def test_stats_rows_as_inputs(tmp_path: Path) -> None:
    base = TinyNet()
    out = make_pack(tmp_path, base, precision=Precision(8, 8))
    g = torch.Generator().manual_seed(0)
    rows40 = torch.randn(20, 40, generator=g)
    rows56 = torch.randn(20, 56, generator=g)
    layers = {
        "blocks.0.up": LayerStats(rows40.abs().amax(0), rows40, 20),
        "proj": LayerStats(rows40.abs().amax(0), rows40, 20),
        "blocks.0.down": LayerStats(rows56.abs().amax(0), rows56, 20),
    }
    stats = Stats(layers).save(tmp_path / "stats.safetensors")
    data = _json(run("apply", tmp_path / "pack.safetensors", out, "--stats", stats, "--json"))
    assert data["inputs"] == f"rows of {stats}"
    assert all(r["tokens"] == 20 and r["rel_error"] < 0.05 for r in data["layers"])


def test_bfloat16(tmp_path: Path) -> None:
    base = TinyNet()
    out = make_pack(tmp_path, base)
    result = apply(tmp_path / "pack.safetensors", out, dtype="bfloat16", repeats=1)
    assert result.dtype == "bfloat16"
    for r in result.rows:
        bias = 0 if r.name == "blocks.0.down" else r.shape[0]
        assert r.bytes_fp == 2 * (r.shape[0] * r.shape[1] + bias)
        assert r.rel_error < 0.2


@pytest.mark.slow
def test_minilm(tmp_path: Path, minilm: Path) -> None:
    out = tmp_path / "pack"
    assert run("pack", minilm, "-o", out, "--json").exit_code == 0
    data = _json(run("apply", minilm, out, "--json", "--repeats", "1", "--tokens", "16"))
    assert len(data["layers"]) == 37
    assert data["worst_rel_error"] < 0.2
    assert all(r["sqnr_db"] > 14 for r in data["layers"])


def test_unavailable_device_is_one_line(tmp_path: Path) -> None:
    out = make_pack(tmp_path, TinyNet())
    result = run("apply", tmp_path / "pack.safetensors", out, "--device", "cuda:7")
    assert result.exit_code == 1
    assert "error: invalid or unavailable device 'cuda:7'" in ANSI.sub("", result.stderr)
