"""`duquant demo`: the MiniLM variant for real, the SmolLM2 story's table and its guard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from duquant_cli.cli import app
from duquant_cli.commands import demo as demo_mod
from duquant_cli.commands.evaluate import EvalRow
from duquant_cli.errors import ConfigError

runner = CliRunner()


def test_demo_refuses_to_replace_what_it_did_not_write(tmp_path: Path) -> None:
    foreign = tmp_path / "duquant-w4a8-b16"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"duquant-w4a8-b16: exists and is not a demo output"):
        demo_mod.demo_smollm2(tmp_path)
    assert (foreign / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["duquant-w4a8-b16"]


def test_demo_table(monkeypatch, tmp_path: Path) -> None:
    def fake(work_dir, **kw):
        result = demo_mod.DemoResult(
            Path(work_dir), Path("ckpt"), "lee_background.cor", (0, 7), (8, 15), 512
        )
        result.rows = [
            EvalRow("fp32", None, 33.06, 1.0),
            EvalRow("round-to-nearest", "p/rtn", 74.9, 1.0, 210),
            EvalRow("DuQuant", "p/dq", 36.4, 1.0, 210),
        ]
        return result

    monkeypatch.setattr(demo_mod, "demo_smollm2", fake)
    res = runner.invoke(app, ["demo", "--work-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "36.40" in res.output and "+10.1%" in res.output and "windows 8..15" in res.output
    res = runner.invoke(app, ["demo", "--work-dir", str(tmp_path), "--json"])
    data = json.loads(res.output)
    assert [r["label"] for r in data["rows"]] == ["fp32", "round-to-nearest", "DuQuant"]
    assert data["rows"][2]["vs_fp"] == pytest.approx(36.4 / 33.06 - 1)


def test_demo_minilm(minilm, tmp_path: Path) -> None:
    res = runner.invoke(app, ["demo", "--minilm", "--work-dir", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.output)["layers"]) == 37
    assert (tmp_path / "minilm-w4a8-b16" / "manifest.json").is_file()
