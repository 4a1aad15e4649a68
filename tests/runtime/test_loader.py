"""`load_packed`: swaps, reports, prefixes, state dicts, and every refusal leaving the model be."""

from __future__ import annotations

import gc
import json
import re
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

from duquant_cli.config import Precision, RowRot
from duquant_cli.errors import ConfigError, MismatchError, PackError
from duquant_cli.formats.pack import MANIFEST, Pack
from duquant_cli.math.bitpack import unpack_codes
from duquant_cli.math.quantize import dequantize
from duquant_cli.runtime.calibrate import calibrating
from duquant_cli.runtime.layer import DuQuantLinear
from duquant_cli.runtime.loader import LoadReport, load_packed, module_name
from tests.helpers import dense, rel_err
from tests.runtime.util import (
    LINEARS,
    W16A16,
    TinyNet,
    assert_untouched,
    clone_model,
    make_pack,
    snapshot,
)


class Wrapped(nn.Module):
    """TinyNet one level down, as `model.` in a model whose checkpoint had no prefix."""

    def __init__(self, **kw) -> None:
        super().__init__()
        self.model = TinyNet(**kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


@pytest.fixture
def packed(tmp_path: Path) -> tuple[TinyNet, Path]:
    base = TinyNet()
    return base, make_pack(tmp_path, base)


def test_load_replaces_every_packed_linear(packed) -> None:
    base, out = packed
    model = clone_model(base)
    report = load_packed(model, out, verify_source=True, backend="dense")
    assert isinstance(report, LoadReport)
    assert sorted(report.replaced) == sorted(LINEARS) and report.skipped == []
    for name in LINEARS:
        m = model.get_submodule(name)
        assert isinstance(m, DuQuantLinear) and m.name == name
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert report.bytes_before == sum(
        p.numel() * p.element_size() for n, p in base.named_parameters()
    )
    assert report.bytes_after == sum(b.numel() * b.element_size() for b in model.buffers())


def test_old_weights_are_released(packed) -> None:
    base, out = packed
    model = clone_model(base)
    refs = [weakref.ref(model.get_submodule(n).weight) for n in LINEARS]
    mods = [weakref.ref(model.get_submodule(n)) for n in LINEARS]
    load_packed(model, out, backend="dense")
    gc.collect()
    assert [r() for r in refs] == [None] * 3
    assert [r() for r in mods] == [None] * 3


def test_bytes_after_close_to_before_for_a_large_layer(tmp_path: Path) -> None:
    """Dense w4a8 keeps the dequantized weight in fp32, the row restore folded in: the same
    bytes plus the input transforms (perm int64 [in], in2 blocks, B/out of the weight, and
    their row scales, 1/out)."""
    lin = nn.Linear(512, 512)
    base = nn.Sequential(lin)
    out = make_pack(tmp_path, base)
    model = nn.Sequential(nn.Linear(512, 512))
    model.load_state_dict(base.state_dict())
    report = load_packed(model, out, backend="dense")
    assert report.bytes_before == 4 * (512 * 512 + 512)
    overhead = 8 * 512 + 4 * 512 * 16 + 4 * 512  # perm, in2, its row scales
    assert report.bytes_after == report.bytes_before + overhead
    assert report.bytes_after <= 1.1 * report.bytes_before


def test_device_and_dtype_options(packed) -> None:
    base, out = packed
    model = clone_model(base)
    load_packed(model, out, device="cpu", dtype=torch.bfloat16, backend="dense")
    m = model.proj
    assert m.weight.dtype == torch.bfloat16 and m.perm.dtype == torch.int64
    assert m.backend.value == "dense" and m.backend_reason == "requested"


@pytest.mark.parametrize(
    "prefix",
    ["model.", ("", "model.")],
    ids=["string", "tuple"],
)
def test_prefix_maps_pack_names_onto_module_names(tmp_path: Path, prefix) -> None:
    base = TinyNet()
    out = make_pack(tmp_path, base, precision=W16A16)
    model = Wrapped()
    model.model.load_state_dict(base.state_dict())
    report = load_packed(model, out, prefix=prefix, backend="dense")
    assert sorted(report.replaced) == sorted(f"model.{n}" for n in LINEARS)
    assert model.model.proj.name == "proj"  # the layer keeps its pack name
    x = torch.randn(5, 40)
    with torch.no_grad():
        assert rel_err(model(x), base(x)) < 1e-5


def test_tuple_prefix_replaces_a_leading_part(tmp_path: Path) -> None:
    base = Wrapped()
    out = make_pack(tmp_path, base, precision=W16A16)  # pack names start with "model."
    model = nn.Module()
    model.net = clone_model(base.model)
    report = load_packed(model, out, prefix=("model.", "net."), backend="dense")
    assert sorted(report.replaced) == sorted(f"net.{n}" for n in LINEARS)
    assert module_name("model.proj", ("model.", "net.")) == "net.proj"
    assert module_name("other.proj", ("model.", "net.")) == "other.proj"
    assert module_name("proj", "a.b.") == "a.b.proj"


def test_state_dict_round_trip_into_a_fresh_model(tmp_path: Path, packed) -> None:
    base, out = packed
    model = clone_model(base)
    load_packed(model, out, backend="dense")
    x = torch.randn(4, 6, 40)
    with calibrating(model), torch.no_grad():  # static scales live in the state dict too
        model(x)
    with torch.no_grad():
        want = model(x)
    state = model.state_dict()
    assert {"proj.weight", "proj.perm", "proj.in2", "proj.act_scale"} <= set(state)
    assert "proj.out" not in state  # folded into the weight
    torch.save(state, tmp_path / "state.pt")

    fresh = TinyNet(seed=1)  # other weights: everything must come from the state dict
    load_packed(fresh, out, backend="dense")
    assert fresh.proj.act_mode == "dynamic"
    fresh.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert fresh.proj.act_mode == "static" and fresh.proj.calibrated
    with torch.no_grad():
        assert torch.equal(fresh(x), want)


def test_state_dict_of_an_earlier_layer_format_is_refused(tmp_path: Path, packed) -> None:
    base, out = packed
    model = clone_model(base)
    load_packed(model, out, backend="dense")
    state = model.state_dict()
    assert state._metadata["proj"]["version"] == 4
    state._metadata["proj"]["version"] = 1
    fresh = clone_model(base)
    load_packed(fresh, out, backend="dense")
    with pytest.raises(RuntimeError, match=r"proj\.: state dict of DuQuant layer format 1"):
        fresh.load_state_dict(state)


def _saved(packed) -> tuple[Path, torch.Tensor, torch.Tensor, dict]:
    """(pack, input, output, state dict) of a dense model, to rewrite in an earlier format."""
    base, out = packed
    model = clone_model(base)
    load_packed(model, out, backend="dense")
    x = torch.randn(3, 40)
    with torch.no_grad():
        return out, x, model(x), model.state_dict()


def _fresh(out: Path, state: dict) -> TinyNet:
    """A model of other weights prepared with the pack, then given `state`."""
    fresh = TinyNet(seed=1)
    load_packed(fresh, out, backend="dense")
    fresh.load_state_dict(state)
    return fresh


def test_state_dict_of_layer_format_2_loads(packed) -> None:
    """Format 2 held the input blocks transposed: they are transposed back on loading."""
    out, x, want, state = _saved(packed)
    in2 = state["proj.in2"]
    for name in LINEARS:
        state._metadata[name]["version"] = 2
        for f in ("in1", "in1_tail", "in2", "in2_tail"):
            if f"{name}.{f}" in state:
                state[f"{name}.{f}"] = state[f"{name}.{f}"].mT.contiguous()
    assert not torch.equal(state["proj.in2"], in2)
    with torch.no_grad():
        assert torch.equal(_fresh(out, state)(x), want)


def test_state_dict_of_layer_format_3_loads(packed) -> None:
    """Format 3 held a dense layer's weight without the row restore, its `out` blocks and the
    bias rotated back by them: loading folds the restore in, as load_packed does now."""
    out, x, want, state = _saved(packed)
    pack = Pack.open(out)
    for name in LINEARS:
        t, entry = pack.load(name), pack.layers[name]
        state._metadata[name]["version"] = 3
        codes = unpack_codes(t["qweight"], entry.precision.w_bits, entry.in_features)
        state[f"{name}.weight"] = dequantize(codes, t["scale"], t.get("zero"), 4)
        for f in ("out", "out_tail"):
            if f in t:
                state[f"{name}.{f}"] = t[f]
        if f"{name}.bias" in state:
            state[f"{name}.bias"] = state[f"{name}.bias"] @ dense(t, "out").T
    fresh = _fresh(out, state)
    assert fresh.proj.out is None
    with torch.no_grad():
        assert rel_err(fresh(x), want) < 1e-6


# --- refusals: one error listing every problem, the model untouched --------------------------


def _refused(model: nn.Module, exc_type, pattern: str, *args, **kw) -> str:
    snap = snapshot(model)
    with pytest.raises(exc_type) as info:
        load_packed(model, *args, **({"backend": "dense"} | kw))
    assert_untouched(model, snap)
    msg = str(info.value)
    assert "\n" not in msg
    assert re.search(pattern, msg), msg
    return msg


def test_pack_for_other_shapes(tmp_path: Path) -> None:
    other = TinyNet(dims=(32, 64, 16))
    out = make_pack(tmp_path, other)
    model = TinyNet()
    msg = _refused(model, MismatchError, "pack does not fit the model: 3 problem", out)
    assert "blocks.0.up: model has 56x40, pack has 64x32" in msg
    assert "blocks.0.down: model has 40x56, pack has 32x64" in msg
    assert "proj: model has 24x40, pack has 16x32" in msg


def test_missing_layer_strict_and_not(tmp_path: Path) -> None:
    base = TinyNet()
    out = make_pack(tmp_path, base)
    model = clone_model(base)
    model.blocks[0]["up"] = nn.Identity()  # a module of the wrong kind is always an error
    _refused(model, MismatchError, r"blocks\.0\.up: is Identity, not nn\.Linear", out)
    del model.blocks[0]["up"]
    msg = _refused(model, MismatchError, r"blocks\.0\.up: no such module in the model", out)
    assert msg.count("problem(s)") == 1 and "1 problem" in msg
    report = load_packed(model, out, strict=False, backend="dense")
    assert report.skipped == [("blocks.0.up", "blocks.0.up: no such module in the model")]
    assert sorted(report.replaced) == ["blocks.0.down", "proj"]


def test_newer_format_version(packed) -> None:
    base, out = packed
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["format_version"] = 99
    (out / MANIFEST).write_text(json.dumps(manifest))
    _refused(
        clone_model(base), PackError, r"pack format version 99 is newer than this duquant", out
    )


def test_stale_pack_with_verify_source(packed) -> None:
    base, out = packed
    model = clone_model(base)
    with torch.no_grad():
        model.proj.weight[0, 0] += 1e-3
        model.blocks[0]["up"].weight[1, 1] -= 1e-3
    msg = _refused(
        model, MismatchError, r"pack was made from other weights: 2 stale layer\(s\)", out,
        verify_source=True,
    )  # fmt: skip
    assert "blocks.0.up" in msg and "proj" in msg and "down" not in msg
    load_packed(model, out, backend="dense")  # without the check it loads (the user asked for it)


def test_verify_source_accepts_a_cast_model(packed) -> None:
    """The hash is taken in the source's dtype, so an upcast copy of the weights passes."""
    base, out = packed
    model = clone_model(base).double()
    load_packed(model, out, verify_source=True, backend="dense")
    assert model.proj.weight.dtype == torch.float64


def test_loading_twice_is_refused(packed) -> None:
    base, out = packed
    model = clone_model(base)
    load_packed(model, out, backend="dense")
    _refused(model, MismatchError, r"already a DuQuant layer \(load_packed ran twice\?\)", out)


def test_bad_tensor_in_pack_refused_before_any_swap(packed) -> None:
    base, out = packed
    manifest = json.loads((out / MANIFEST).read_text())
    entry = next(e for e in manifest["layers"] if e["name"] == "proj")
    entry["tensors"]["in2"]["shape"] = [3, 16, 16]  # 48 channels for a 40-input layer
    (out / MANIFEST).write_text(json.dumps(manifest))
    bad = r"proj: in2 covers 56 channels, the layer has 40"
    _refused(clone_model(base), MismatchError, bad, out)


def test_propagate_bias_mismatch(tmp_path: Path) -> None:
    base = TinyNet()
    out = make_pack(tmp_path, base, row_rot=RowRot.PROPAGATE)
    model = clone_model(base)
    model.blocks[0]["down"] = nn.Linear(56, 40, bias=True)
    model.blocks[0]["down"].weight = base.blocks[0]["down"].weight
    bad = r"blocks\.0\.down: model has bias, unlike the pack's source \(propagate mode\)"
    _refused(model, MismatchError, bad, out)


@pytest.mark.parametrize(
    ("kw", "pattern"),
    [
        ({"backend": "int2"}, r"unknown backend 'int2': choose one of auto, dense, int8, int4"),
        ({"dtype": torch.int8}, r"dtype must be a floating torch dtype"),
        ({"device": "nowhere"}, r"invalid or unavailable device .nowhere."),
        ({"device": "cuda:7"}, r"invalid or unavailable device .cuda:7."),
    ],
)
def test_bad_options(packed, kw, pattern) -> None:
    base, out = packed
    _refused(clone_model(base), ConfigError, pattern, out, **kw)


def test_layer_precision_override(tmp_path: Path) -> None:
    from duquant_cli.config import parse_layer_bits

    base = TinyNet()
    out = make_pack(tmp_path, base, layer_bits=parse_layer_bits(["proj=w8a16"]))
    model = clone_model(base)
    load_packed(model, out, backend="dense")
    assert (model.proj.w_bits, model.proj.a_bits, model.proj.act_mode) == (8, 16, "none")
    assert model.blocks[0]["up"].act_mode == "dynamic"
    assert Precision(8, 16).quantize_weight


def test_failure_while_building_leaves_the_model_be(packed, monkeypatch) -> None:
    """Every layer is built before the first swap: a bad tensor in the last one changes
    nothing (here a permutation with a repeated index, caught only once loaded)."""
    base, out = packed
    real_load = Pack.load

    def load(self, name):
        t = real_load(self, name)
        if name == "proj":
            t["perm"] = torch.zeros_like(t["perm"])
        return t

    monkeypatch.setattr(Pack, "load", load)
    _refused(clone_model(base), MismatchError, r"^proj: perm is not a permutation of 40$", out)


def test_missing_shard(packed) -> None:
    base, out = packed
    (out / "tensors-00001.safetensors").unlink()
    _refused(
        clone_model(base), PackError, r"tensors-00001\.safetensors: tensor file .* missing", out
    )
