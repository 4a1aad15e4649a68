"""Integer backends: they agree with the dense reference, are chosen (or not) for stated
reasons, compile, save and load, and take the memory they promise."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from duquant_cli.config import Precision, Scheme
from duquant_cli.errors import ConfigError
from duquant_cli.runtime.backends import Backend
from duquant_cli.runtime.calibrate import calibrating
from duquant_cli.runtime.layer import DuQuantLinear
from duquant_cli.runtime.loader import load_packed
from duquant_cli.runtime.status import status
from tests.runtime.util import LINEARS, W16A16, TinyNet, clone_model, make_pack

W4A8, W8A8, W4A16 = Precision(4, 8), Precision(8, 8), Precision(4, 16)
DIMS = (64, 96, 32)  # inputs divisible by 32, as torch's int4 kernel needs


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def loaded(base: TinyNet, pack: Path, backend: str, dtype=torch.float32) -> TinyNet:
    model = clone_model(base, dims=DIMS).to(dtype)
    load_packed(model, pack, backend=backend)
    return model


@pytest.mark.parametrize("precision", [W4A8, W8A8], ids=str)
@pytest.mark.parametrize("tokens", [1, 3, 64])
def test_int8_matches_dense(tmp_path: Path, precision: Precision, tokens: int) -> None:
    """Integer accumulation is exact, so int8 and dense differ by float rounding only: the same
    codes, the same activation codes, the same scales. One token included: the operand order
    that torch 2.13 gets wrong for a single row must not be the one used."""
    base = TinyNet(dims=DIMS)
    pack = make_pack(tmp_path, base, precision=precision)
    dense, int8 = loaded(base, pack, "dense"), loaded(base, pack, "int8")
    assert {r["backend"] for r in status(int8)} == {"int8"}
    for name in LINEARS:  # layer by layer: through a model, one flipped code would compound
        a, b = dense.get_submodule(name), int8.get_submodule(name)
        x = torch.randn(tokens, a.in_features)
        with torch.no_grad():
            assert rel(b(x), a(x)) < 1e-5, name


@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
def test_int4_matches_dense(tmp_path: Path, asym: bool) -> None:
    base = TinyNet(dims=DIMS)
    scheme = Scheme.ASYM if asym else Scheme.SYM
    pack = make_pack(tmp_path, base, precision=W4A16, weight_scheme=scheme)
    dense, int4 = loaded(base, pack, "dense"), loaded(base, pack, "int4")
    assert {r["backend"] for r in status(int4)} == {"int4"}
    x = torch.randn(5, DIMS[0])
    with torch.no_grad():
        assert rel(int4(x), dense(x)) < 1e-5
        # bf16: both round to bf16, the kernels differently; within bf16's precision
        d16, i16 = loaded(base, pack, "dense", torch.bfloat16), loaded(base, pack, "int4")
        i16 = i16.to(torch.bfloat16)
        assert rel(i16(x.bfloat16()), d16(x.bfloat16())) < 2e-2


def test_auto_picks_per_layer_and_says_why(tmp_path: Path) -> None:
    base = TinyNet(dims=DIMS)
    cases = {
        "w4a8": ({"precision": W4A8}, "int8", "int8 kernel fits"),
        "w4a16": ({"precision": W4A16}, "int4", "int4 kernel fits"),
        "grouped": ({"precision": W4A8, "group_size": 16}, "dense", "grouped weight scales"),
        "asym-act": ({"precision": W4A8, "act_scheme": Scheme.ASYM}, "dense", "asymmetric act"),
        "w16a16": ({"precision": Precision(16, 16)}, "dense", "no integer weights"),
    }
    for name, (cfg, backend, why) in cases.items():
        model = loaded(base, make_pack(tmp_path, base, name=name, **cfg), "auto", torch.bfloat16)
        rows = status(model)
        assert {r["backend"] for r in rows} == {backend}, name
        assert all(why in r["backend_reason"] for r in rows), (name, rows[0]["backend_reason"])
    # float32 activations: the int4 kernel is slower than dense there, so auto keeps dense
    model = loaded(base, make_pack(tmp_path, base, name="f32", precision=W4A16), "auto")
    assert all("slower than dense on float32" in r["backend_reason"] for r in status(model))


def test_requested_backend_that_cannot_run_falls_back_logged(tmp_path: Path, caplog) -> None:
    base = TinyNet(dims=DIMS)
    pack = make_pack(tmp_path, base, precision=W4A16)
    with caplog.at_level(logging.WARNING, logger="duquant"):
        model = loaded(base, pack, "int8")
    rows = status(model)
    assert {r["backend"] for r in rows} == {"dense"}
    assert all("int8 requested, not possible" in r["backend_reason"] for r in rows)
    assert sum("int8 backend not possible" in m for m in caplog.messages) == len(LINEARS)


def test_static_calibration_needs_dense(tmp_path: Path) -> None:
    base = TinyNet(dims=DIMS)
    model = loaded(base, make_pack(tmp_path, base, precision=W4A8), "int8")
    with (
        pytest.raises(ConfigError, match=r"static activation scales need the dense backend"),
        calibrating(model),
    ):
        pass
    assert all(r["activations"] == "dynamic" for r in status(model))


@pytest.mark.parametrize(
    "backend,precision", [("int8", W4A8), ("int4", W4A16), ("dense", W4A8), ("dense", W16A16)]
)
def test_compiles_fullgraph(tmp_path: Path, backend: str, precision: Precision) -> None:
    base = TinyNet(dims=DIMS)
    model = loaded(base, make_pack(tmp_path, base, precision=precision), backend)
    torch._dynamo.reset()  # other tests' compiled frames count against the recompile limit
    compiled = torch.compile(model, fullgraph=True, dynamic=True)  # any token count
    for tokens in (7, 1, 20):
        x = torch.randn(tokens, DIMS[0])
        with torch.no_grad():
            assert rel(compiled(x), model(x)) < 1e-5, tokens


@pytest.mark.parametrize("backend,precision", [("int8", W4A8), ("int4", W4A16)])
def test_state_dict_round_trip(tmp_path: Path, backend: str, precision: Precision) -> None:
    base = TinyNet(dims=DIMS)
    pack = make_pack(tmp_path, base, precision=precision)
    model = loaded(base, pack, backend)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    fresh = loaded(TinyNet(seed=5, dims=DIMS), pack, backend)
    fresh.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    x = torch.randn(4, DIMS[0])
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_integer_memory(tmp_path: Path) -> None:
    """Per layer: int4 holds at most 0.3x the bf16 weight, int8 at most 0.55x (a pi0.5 attention
    shape, 2048x2048; the transforms are a few percent)."""
    lin = torch.nn.Linear(2048, 2048)
    net = torch.nn.Sequential()
    net.add_module("l", lin)
    sizes = {}
    for backend, precision in (("int4", W4A16), ("int8", W4A8)):
        pack = make_pack(tmp_path, net, name=backend, precision=precision)
        model = torch.nn.Sequential()
        model.add_module("l", torch.nn.Linear(2048, 2048, dtype=torch.bfloat16))
        load_packed(model, pack, backend=backend)
        layer = model.l
        assert isinstance(layer, DuQuantLinear) and layer.backend is Backend(backend)
        sizes[backend] = status(model)[0]["bytes"] / (2 * 2048 * 2048)
    assert sizes["int4"] <= 0.3 and sizes["int8"] <= 0.55, sizes
