"""`calibrating` fixes static activation scales explicitly; `save_act_scales` keeps them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from duquant_cli.errors import ConfigError, PackError
from duquant_cli.formats.pack import MANIFEST, Pack
from duquant_cli.runtime.calibrate import calibrating, percentile_rank, save_act_scales
from duquant_cli.runtime.layer import ACT_SCALE_MIN
from duquant_cli.runtime.loader import load_packed
from tests.helpers import dense
from tests.runtime.util import LINEARS, W16A16, TinyNet, clone_model, make_pack


def _batches(n: int = 3, rows: int = 50, seed: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, 40, generator=g) * (1 + i) for i in range(n)]


def _transformed(x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The layer's input in the packed basis, by the pack-format equation (dense matrices)."""
    x = x.double()
    if "perm" in tensors:
        x = x[:, tensors["perm"]]
    return x @ dense(tensors, "in2").double()


@pytest.fixture
def loaded(tmp_path: Path):
    base = TinyNet()
    out = make_pack(tmp_path, base)
    model = clone_model(base)
    load_packed(model, out, backend="dense")
    return base, model, out


@pytest.mark.parametrize("percentile", [99.9, 90.0, 50.0, 100.0])
def test_scales_are_the_configured_percentile(loaded, percentile: float) -> None:
    _, model, out = loaded
    batches = _batches()
    with calibrating(model, percentile=percentile) as names, torch.no_grad():
        for b in batches:
            model.proj(b)
    assert names == ["proj"]  # the other layers saw no batch: left dynamic
    assert model.blocks[0]["up"].act_mode == "dynamic"
    proj = model.proj
    assert proj.act_mode == "static" and proj.calibrated and proj.act_percentile == percentile
    # direct: per batch the nearest-rank percentile of |x| per channel, max over batches
    t = Pack.open(out).load("proj")
    per_batch = []
    for b in batches:
        a = _transformed(b, t).abs().sort(dim=0).values
        per_batch.append(a[math.ceil(percentile / 100 * a.shape[0]) - 1])
    want = (torch.stack(per_batch).amax(0) / 127).clamp_min(ACT_SCALE_MIN)
    assert torch.allclose(proj.act_scale.double(), want, rtol=1e-5, atol=0)


def test_percentile_rank_is_nearest_rank() -> None:
    assert percentile_rank(99.9, 1000) == 999
    assert percentile_rank(99.9, 50) == 50
    assert percentile_rank(50, 5) == 3
    assert percentile_rank(100, 7) == 7
    assert percentile_rank(0.001, 7) == 1


def test_static_outputs_differ_from_dynamic_and_are_close_to_fp(loaded) -> None:
    base, model, _ = loaded
    x = _batches(1)[0]
    with torch.no_grad():
        dynamic = model(x)
        with calibrating(model):
            model(x)
        static = model(x)
        fp = base(x)
    assert not torch.equal(static, dynamic)
    assert (static - fp).norm() / fp.norm() < 0.3


def test_error_inside_the_block_leaves_layers_as_they_were(loaded) -> None:
    _, model, _ = loaded
    with pytest.raises(RuntimeError, match="boom"), calibrating(model), torch.no_grad():
        model(_batches(1)[0])
        raise RuntimeError("boom")
    for name in LINEARS:
        m = model.get_submodule(name)
        assert m.act_mode == "dynamic" and m.act_scale is None and m.observer is None


def test_bad_calls(loaded, tmp_path: Path) -> None:
    _, model, _ = loaded
    bad = r"percentile must be in \(0, 100\], got 0"
    with pytest.raises(ConfigError, match=bad), calibrating(model, percentile=0):
        pass
    fp_only = clone_model(TinyNet())
    load_packed(
        fp_only, make_pack(tmp_path, TinyNet(), name="fp", precision=W16A16), backend="dense"
    )
    none = "has no DuQuant layers with quantized activations"
    with pytest.raises(ConfigError, match=none), calibrating(fp_only):
        pass


def test_save_act_scales_round_trip(loaded) -> None:
    base, model, out = loaded
    x = _batches(1)[0]
    with calibrating(model, percentile=99.0) as names, torch.no_grad():
        model(x)
    assert sorted(names) == sorted(LINEARS)
    with torch.no_grad():
        want = model(x)
    assert sorted(save_act_scales(model, out)) == sorted(LINEARS)

    pack = Pack.open(out)  # still a readable pack, every tensor loads
    for name, entry in pack.layers.items():
        t = pack.load(name)
        assert entry.quant["act_mode"] == "static" and entry.quant["act_percentile"] == 99.0
        assert torch.equal(t["act_scale"], model.get_submodule(name).act_scale)
    manifest = json.loads((out / MANIFEST).read_text())
    assert [f["name"] for f in manifest["files"]] == [
        "tensors-00001.safetensors",
        "tensors-00002.safetensors",
    ]

    fresh = clone_model(base)
    load_packed(fresh, out, backend="dense")
    assert fresh.proj.act_mode == "static" and fresh.proj.calibrated
    with torch.no_grad():
        assert torch.equal(fresh(x), want)

    # calibrating again replaces the scales; the shard of the old ones goes away
    with calibrating(fresh, percentile=90.0), torch.no_grad():
        fresh(x * 2)
    save_act_scales(fresh, out)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["manifest.json", "tensors-00001.safetensors", "tensors-00003.safetensors"]
    again = clone_model(base)
    load_packed(again, out, backend="dense")
    assert torch.equal(again.proj.act_scale, fresh.proj.act_scale)
    assert Pack.open(out).layers["proj"].quant["act_percentile"] == 90.0


def test_save_act_scales_needs_calibrated_layers(loaded) -> None:
    _, model, out = loaded
    with pytest.raises(PackError, match="no calibrated DuQuant layer of this pack in the model"):
        save_act_scales(model, out)


def test_scales_calibrated_in_bfloat16_are_float32(loaded) -> None:
    """Like the transforms, static scales stay float32 whatever the model's dtype."""
    _, model, _ = loaded
    model.to(torch.bfloat16)
    with calibrating(model), torch.no_grad():
        model.proj(_batches()[0].bfloat16())
    assert model.proj.act_scale.dtype == torch.float32
    assert model.proj.compute_dtype == torch.bfloat16
