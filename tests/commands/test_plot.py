"""`duquant inspect --plot`: weight errors, and what the input transform does to activations."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from duquant_cli.commands.plot import plot_data, save_plot, transform_input
from duquant_cli.errors import ConfigError
from duquant_cli.formats.pack import Pack
from tests.commands.kinds import build, run, small_stats
from tests.helpers import SMALL_LINEARS, dense

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def packs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kinds")
    stats = small_stats().save(root / "stats.safetensors")
    return {"data_free": build("data_free", root), "calibrated": build("calibrated", root),
            "stats": stats}  # fmt: skip


def test_transform_input_follows_the_runtime_equation(packs: dict[str, Path]) -> None:
    for kind in ("data_free", "calibrated"):
        t = Pack.open(packs[kind]).load(SMALL_LINEARS[1])
        x = torch.randn(7, 40, dtype=torch.float64)
        want = x
        if "in1" in t:
            want = want @ dense(t, "in1").double()
        want = want[:, t["perm"]] @ dense(t, "in2").double()
        assert torch.allclose(transform_input(x, t).double(), want, atol=1e-5)


def test_activation_picture_shows_the_outlier_flattened(packs: dict[str, Path]) -> None:
    data = plot_data(packs["calibrated"], stats=packs["stats"], act_layer=SMALL_LINEARS[1])
    assert data.act_layer == SMALL_LINEARS[1] and data.before and data.after
    before, after = torch.tensor(data.before), torch.tensor(data.after)
    assert int(before.argmax()) == 11  # the outlier channel small_stats planted
    peak = lambda v: float(v.max() / v.median())  # noqa: E731
    assert peak(after) < peak(before) / 3
    assert data.names == SMALL_LINEARS and all(e is not None and e > 0 for e in data.errors)


def test_default_activation_layer_is_the_first_with_stats(packs: dict[str, Path]) -> None:
    data = plot_data(packs["calibrated"], stats=packs["stats"], layer="mlp")
    assert data.act_layer == "layers.0.mlp.down" and len(data.names) == 2


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("matplotlib") is None, reason="needs matplotlib"
)
def test_plot_files(packs: dict[str, Path], tmp_path: Path) -> None:
    res = run("inspect", packs["data_free"], "--plot", tmp_path / "a.png")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "a.png").read_bytes()[:8] == PNG
    out = tmp_path / "sub" / "b.png"
    res = run("inspect", packs["calibrated"], "--plot", out, "--stats", packs["stats"], "--json")
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:8] == PNG and f'"plot": "{out}"' in res.stdout
    one = (tmp_path / "a.png").stat().st_size
    assert out.stat().st_size > one  # two panels


def test_plot_errors(packs: dict[str, Path], tmp_path: Path) -> None:
    res = run("inspect", packs["data_free"], "--plot", tmp_path / "a.png", "--plot-layer", "x")
    assert res.exit_code == 1 and "--plot-layer needs --stats" in res.stderr
    res = run(
        "inspect", packs["calibrated"], "--plot", tmp_path / "a.png", "--stats", packs["stats"],
        "--plot-layer", "nope",
    )  # fmt: skip
    assert res.exit_code == 1 and "--plot-layer 'nope': no such layer" in res.stderr
    res = run("inspect", packs["data_free"], "--plot", tmp_path / "a.png", "--stats", tmp_path)
    assert res.exit_code == 1 and "no such statistics file" in res.stderr


def test_without_matplotlib(
    packs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ConfigError, match=r"pip install 'duquant\[plot\]'"):
        save_plot(plot_data(packs["data_free"]), tmp_path / "a.png")
    assert not (tmp_path / "a.png").exists()
