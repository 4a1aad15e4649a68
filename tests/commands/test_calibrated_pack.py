"""`duquant pack --calib` end to end: collect_stats -> stats file -> CLI pack -> load_packed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from duquant_cli.cli import app
from duquant_cli.commands.pack import calibrated_config, pack
from duquant_cli.errors import ConfigError
from duquant_cli.formats.pack import Pack
from duquant_cli.formats.stats import Stats
from duquant_cli.runtime.collect import collect_stats
from duquant_cli.runtime.loader import load_packed
from tests.helpers import rel_err
from tests.runtime.util import LINEARS, TinyNet, clone_model, save_model

runner = CliRunner()


def _x(rows: int = 64, seed: int = 0) -> torch.Tensor:
    x = torch.randn(4, rows // 4, 40, generator=torch.Generator().manual_seed(seed))
    x[..., 7] *= 30  # a massive input channel, as LLMs have
    return x


@pytest.fixture
def setup(tmp_path: Path) -> tuple[TinyNet, Path, Path]:
    model = TinyNet()
    ckpt = save_model(model, tmp_path / "tiny.safetensors")
    stats = collect_stats(model, [_x(seed=s) for s in range(4)], max_rows=128)
    return model, ckpt, stats.save(tmp_path / "stats.safetensors")


def _pack(ckpt: Path, stats: Path, out: Path, *args: str):
    return runner.invoke(
        app,
        ["pack", str(ckpt), "--calib", str(stats), "-o", str(out), "--no-default-exclude", *args],
    )


def test_w16a16_calibrated_pack_reproduces_the_model(setup, tmp_path: Path) -> None:
    model, ckpt, stats = setup
    res = _pack(ckpt, stats, tmp_path / "p", "--bits", "w16a16")
    assert res.exit_code == 0, res.output
    packed = clone_model(model)
    report = load_packed(packed, tmp_path / "p", verify_source=True)
    assert sorted(report.replaced) == sorted(LINEARS)
    x = _x(seed=9)
    with torch.no_grad():
        assert rel_err(packed(x), model(x)) < 1e-5


def test_manifest_records_the_calibrated_recipe(setup, tmp_path: Path) -> None:
    _, ckpt, stats = setup
    res = _pack(ckpt, stats, tmp_path / "p", "--alpha", "0.6", "--rot-steps", "32")
    assert res.exit_code == 0, res.output
    pk = Pack.open(tmp_path / "p")
    cfg = pk.config
    assert cfg.calibrated and cfg.gptq and cfg.rotation.value == "greedy"
    assert cfg.row_rot.value == "off" and cfg.alpha == 0.6 and cfg.rot_steps == 32
    assert pk.manifest["calibration"]["stats"] == str(stats)
    for name, entry in pk.layers.items():
        t = entry.transform
        assert t["smoothed"] is True and t["alpha"] == 0.6 and t["rot_steps"] == 32
        assert t["input_group"] == name  # TinyNet's layers each see their own input
        assert entry.quant["gptq"] is True
        assert entry.info["ortho_error"] < 1e-5
        assert 0 < entry.info["output_rel_error"] < 0.2
        assert {"in1", "perm", "in2", "qweight", "scale"} <= set(entry.tensors)


def test_calibrated_w4a8_is_closer_than_data_free(setup, tmp_path: Path) -> None:
    model, ckpt, stats = setup
    assert _pack(ckpt, stats, tmp_path / "cal").exit_code == 0
    df = ["pack", str(ckpt), "-o", str(tmp_path / "df"), "--no-default-exclude"]
    res = runner.invoke(app, df)
    assert res.exit_code == 0, res.output
    x = _x(seed=5)
    with torch.no_grad():
        ref = model(x)
        errs = {}
        for name in ("cal", "df"):
            packed = clone_model(model)
            load_packed(packed, tmp_path / name)
            errs[name] = rel_err(packed(x), ref)
    assert errs["cal"] < errs["df"]


def test_explicit_options_win_over_the_calibrated_defaults(setup, tmp_path: Path) -> None:
    _, ckpt, stats = setup
    res = _pack(
        ckpt, stats, tmp_path / "p", "--rotation", "hadamard", "--row-rot", "restore", "--no-gptq"
    )
    assert res.exit_code == 0, res.output
    cfg = Pack.open(tmp_path / "p").config
    assert (cfg.rotation.value, cfg.row_rot.value, cfg.gptq) == ("hadamard", "restore", False)


def test_layers_fed_one_input_share_one_transform(tmp_path: Path) -> None:
    """Two layers called on the same tensor: statistics hold one row sample, the pack one
    transform (recorded as the same input group)."""

    class TwoHeads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = torch.nn.Linear(32, 16), torch.nn.Linear(32, 8)

        def forward(self, x):
            return torch.cat([self.a(x), self.b(x)], -1)

    model = TwoHeads()
    ckpt = save_model(model, tmp_path / "m.safetensors")
    stats = collect_stats(model, [torch.randn(64, 32)])
    assert stats["a"].rows is stats["b"].rows
    cfg = calibrated_config()
    pack(ckpt, tmp_path / "p", config=cfg, stats=stats.save(tmp_path / "s.safetensors"))
    pk = Pack.open(tmp_path / "p")
    assert {e.transform["input_group"] for e in pk.layers.values()} == {"a"}
    ta, tb = pk.load("a"), pk.load("b")
    for f in ("in1", "perm", "in2"):
        assert torch.equal(ta[f], tb[f])


def test_errors_are_one_line(setup, tmp_path: Path) -> None:
    model, ckpt, _ = setup
    # statistics missing a selected layer: nothing is written
    partial = collect_stats(model, [_x()], layers=["proj"]).save(tmp_path / "partial.safetensors")
    res = _pack(ckpt, partial, tmp_path / "p")
    assert res.exit_code == 1
    assert "blocks.0.down: no calibration statistics" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "p").exists()
    # --gptq means nothing without statistics
    res = runner.invoke(app, ["pack", str(ckpt), "-o", str(tmp_path / "q"), "--gptq"])
    assert res.exit_code == 1 and "--gptq needs activation statistics" in res.output
    # a statistics file that is not one
    res = _pack(ckpt, ckpt, tmp_path / "r")
    assert res.exit_code == 1 and "not a duquant statistics file" in res.output
    with pytest.raises(ConfigError, match="needs activation statistics"):
        pack(ckpt, tmp_path / "s", config=calibrated_config())


def test_library_default_config_with_stats_is_calibrated(setup, tmp_path: Path) -> None:
    _, ckpt, stats = setup
    summary = pack(ckpt, tmp_path / "p", stats=Stats.load(stats))
    assert sorted(r.name for r in summary.layers) == sorted(LINEARS)
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["config"]["calibrated"] is True and manifest["config"]["gptq"] is True
