"""`status(model)` says what each DuQuant layer really runs with."""

from __future__ import annotations

from pathlib import Path

import torch

from duquant_cli.config import RowRot
from duquant_cli.runtime.calibrate import calibrating
from duquant_cli.runtime.loader import load_packed, module_bytes
from duquant_cli.runtime.prep import library
from duquant_cli.runtime.status import PROPAGATE_NOTE, status
from tests.runtime.util import LINEARS, W16A16, TinyNet, clone_model, make_pack


def _rows(model) -> dict[str, dict]:
    return {r["name"]: r for r in status(model)}


def test_rows_after_load(tmp_path: Path) -> None:
    base = TinyNet()
    model = clone_model(base)
    load_packed(model, make_pack(tmp_path, base), dtype=torch.bfloat16)
    rows = _rows(model)
    assert sorted(rows) == sorted(LINEARS)
    r = rows["proj"]
    assert r == r | {
        "pack_name": "proj",
        "shape": [24, 40],
        "precision": "w4a8",
        "backend": "int8",
        "backend_reason": "auto: int8 kernel fits w4a8 on cpu",
        "device": "cpu",
        "dtype": "float32",  # int8 runs its transforms in float32, returns the input's dtype
        "prequantized": True,
        "cached": True,
        "prep": "fused" if library() is not None else "torch ops",
        "activations": "dynamic",
        "act_calibrated": False,
        "row_rot": "restore",
        "output_rotated": False,
        "note": "",
        "bytes": module_bytes(model.proj),
    }
    assert status(base) == []  # no DuQuant layers, no rows


def test_rows_follow_calibration_and_moves(tmp_path: Path) -> None:
    base = TinyNet()
    model = clone_model(base)
    load_packed(model, make_pack(tmp_path, base), backend="dense")
    assert _rows(model)["proj"]["backend_reason"] == "requested"
    with calibrating(model, percentile=99.5), torch.no_grad():
        assert _rows(model)["proj"]["activations"] == "calibrating"
        model.proj(torch.randn(8, 40))
    rows = _rows(model)
    assert rows["proj"]["activations"] == "static (calibrated, p99.5)"
    assert rows["proj"]["act_calibrated"] is True
    assert rows["blocks.0.up"]["activations"] == "dynamic"  # saw no batch
    model.half()
    r = _rows(model)["proj"]
    assert r["dtype"] == "float16" and r["bytes"] == module_bytes(model.proj)


def test_fp_and_propagate_rows_say_so(tmp_path: Path) -> None:
    base = TinyNet()
    model = clone_model(base)
    load_packed(
        model,
        make_pack(tmp_path, base, precision=W16A16, row_rot=RowRot.PROPAGATE),
        backend="dense",
    )
    r = _rows(model)["proj"]
    assert r["prequantized"] is False and r["activations"] == "none"
    assert r["row_rot"] == "propagate" and r["output_rotated"] is True
    assert r["note"] == PROPAGATE_NOTE and "consumer absorbs" in r["note"]
