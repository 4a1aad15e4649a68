"""oneDNN's prepacked kernels (CPU): the same numbers as torch's kernels on the same pack, and a
layer that still saves, loads, copies, moves, compiles and trains like any module."""

from __future__ import annotations

import copy
import io
import pickle
from pathlib import Path

import pytest
import torch

from duquant_cli.config import Precision, Scheme
from duquant_cli.errors import ConfigError
from duquant_cli.runtime.backends import KERNELS, ONEDNN, Backend, kernel_for
from duquant_cli.runtime.calibrate import calibrating
from duquant_cli.runtime.loader import load_packed
from duquant_cli.runtime.status import status
from tests.runtime.util import LINEARS, TinyNet, clone_model, make_pack

CPU = torch.device("cpu")
DIMS = (64, 96, 32)
pytestmark = pytest.mark.skipif(
    kernel_for(Backend.INT8, CPU, torch.float32) is KERNELS[Backend.INT8],
    reason="this torch build or CPU has no oneDNN kernels",
)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _model(tmp_path: Path, backend: str, dtype=torch.float32, **cfg) -> TinyNet:
    base = TinyNet(dims=DIMS)
    model = clone_model(base, dims=DIMS).to(dtype)
    load_packed(model, make_pack(tmp_path, base, **cfg), backend=backend)
    return model


def _torch_kernels(model: TinyNet) -> TinyNet:
    """A copy of `model` on torch's own kernels."""
    other = copy.deepcopy(model)
    for name in LINEARS:
        layer = other.get_submodule(name)
        layer.use_kernel(KERNELS[layer.backend])
    return other


@pytest.mark.parametrize(
    ("backend", "dtype"),
    [("dense", torch.float32), ("dense", torch.bfloat16), ("int8", torch.float32)],
)
@pytest.mark.parametrize("tokens", [1, 5, 64])
def test_onednn_kernels_compute_what_torch_kernels_do(
    tmp_path: Path, backend: str, dtype, tokens: int
) -> None:
    """Layer by layer: bfloat16 dense gives the same bits without a bias (the same products,
    the same rounding), and with one the same to one rounding step (oneDNN adds the float32
    bias before its one rounding, torch's kernel to the rounded product); float32 dense
    differs by summation order, int8 (whose torch kernel runs channels-major) by the float
    rounding of the transforms only."""
    model = _model(tmp_path, backend, dtype)
    assert {r["kernel"] for r in status(model)} == {"onednn"}
    plain = _torch_kernels(model)
    assert {r["kernel"] for r in status(plain)} == {"torch"}
    for name in LINEARS:
        a, b = model.get_submodule(name), plain.get_submodule(name)
        assert a.weight.is_mkldnn and not b.weight.is_mkldnn
        assert torch.equal(a.plain_weight, b.weight), name
        x = torch.randn(tokens, a.in_features, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            got, want = a(x.to(dtype)), b(x.to(dtype))
        assert got.dtype == want.dtype == dtype
        if dtype == torch.bfloat16:
            # a rounding step of the product, before the bias: of |want| + |bias| at most
            bias = 0.0 if b.bias is None else b.bias.abs()
            step = torch.finfo(dtype).eps * (want.float().abs() + bias)
            assert ((got.float() - want.float()).abs() <= step).all(), name
            a.bias = b.bias = None
            with torch.no_grad():
                assert torch.equal(a(x.to(dtype)), b(x.to(dtype))), name
        else:
            assert rel(got, want) < 1e-5, name


@pytest.mark.parametrize("backend", ["dense", "int8"])
def test_state_dict_pickle_and_deepcopy_hold_the_plain_weight(tmp_path: Path, backend) -> None:
    """A prepacked tensor has no storage: the state dict, pickling and deepcopy see the plain
    weight, and what they give back runs on oneDNN again with identical outputs."""
    model = _model(tmp_path / "a", backend)
    x = torch.randn(7, DIMS[0])
    with torch.no_grad():
        want = model(x)
    sd = model.state_dict()
    assert not any(t.is_mkldnn for t in sd.values())
    buf = io.BytesIO()
    torch.save(sd, buf)
    fresh = _model(tmp_path / "b", backend)  # another pack's layers, then this state dict
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    copies = [fresh, copy.deepcopy(model), pickle.loads(pickle.dumps(model))]
    for m in copies:
        assert {r["kernel"] for r in status(m)} == {"onednn"}
        with torch.no_grad():
            assert torch.equal(m(x), want)


def test_to_takes_the_kernel_of_the_new_dtype(tmp_path: Path) -> None:
    """float16 has no oneDNN kernel on most CPUs: torch's runs it; back in bfloat16, oneDNN's."""
    model = _model(tmp_path, "dense")
    layer = model.get_submodule(LINEARS[0])
    w32 = layer.plain_weight
    expect16 = kernel_for(Backend.DENSE, CPU, torch.float16)
    model.half()
    assert layer.kernel is expect16 and layer.weight.dtype == torch.float16
    assert torch.equal(layer.plain_weight, w32.half())
    model.to(torch.bfloat16)
    assert layer.kernel is ONEDNN[Backend.DENSE] and layer.weight.is_mkldnn
    assert torch.equal(layer.plain_weight, w32.half().bfloat16())


def test_int8_layers_keep_a_float32_weight_scale_through_to(tmp_path: Path) -> None:
    """`model.to(torch.bfloat16)` leaves the int8 weight scale float32 (oneDNN's int8 kernel
    takes no other; it used to be cast, and the next forward raised), with the same outputs."""
    model = _model(tmp_path, "int8")
    layer = model.get_submodule(LINEARS[0])
    x = torch.randn(6, DIMS[0]).bfloat16()
    with torch.no_grad():
        want = model(x)
        model.to(torch.bfloat16)
        assert layer.weight_scale.dtype == torch.float32 and layer.weight.is_mkldnn
        assert torch.equal(model(x), want)


def test_backward_through_the_prepacked_matmul(tmp_path: Path) -> None:
    """The input gradient of the w16a16 oneDNN layer is torch's kernel's (x W^T's: W)."""
    model = _model(tmp_path, "dense", precision=Precision(16, 16))
    plain = _torch_kernels(model)
    grads = []
    for m in (model, plain):
        x = torch.randn(6, DIMS[0], generator=torch.Generator().manual_seed(3))
        x.requires_grad_(True)
        m(x).square().sum().backward()
        grads.append(x.grad)
    assert rel(grads[0], grads[1]) < 1e-5


def test_int8_codes_reach_oneDNN_unsigned_and_exact(tmp_path: Path) -> None:
    """Activations at both ends of the int8 range (-128 under a clipped scale, +127): shifted
    by 128 into uint8 and back by the zero point: no code wraps (a wrapped code would be off
    by 256 steps)."""
    model = _model(tmp_path, "int8", act_scheme=Scheme.SYM)
    plain = _torch_kernels(model)
    layer, ref = model.get_submodule(LINEARS[0]), plain.get_submodule(LINEARS[0])
    layer.act_clip = ref.act_clip = 0.5  # clipped: codes -128 and 127 both occur
    x = torch.randn(9, DIMS[0], generator=torch.Generator().manual_seed(4)) * 3
    with torch.no_grad():
        assert rel(layer(x), ref(x)) < 1e-5


def test_a_refused_state_dict_leaves_the_kernel_as_it_was(tmp_path: Path) -> None:
    """A state dict with static activation scales is refused by an int8 layer before anything
    is loaded: the layer keeps its prepacked weight and kernel."""
    model = _model(tmp_path, "int8")
    layer = model.get_submodule(LINEARS[0])
    sd = model.state_dict()
    sd[LINEARS[0] + ".act_scale"] = torch.ones(layer.in_features)
    with pytest.raises(ConfigError, match=r"static activation scales need the dense backend"):
        model.load_state_dict(sd)
    assert layer.kernel is ONEDNN[Backend.INT8] and layer.weight.is_mkldnn


def _set_bias(model: TinyNet) -> None:
    layer = model.get_submodule(LINEARS[1])
    layer.bias = torch.ones(layer.out_features)


def _calibrate(model: TinyNet) -> None:
    with calibrating(model):
        model(torch.randn(16, DIMS[0], generator=torch.Generator().manual_seed(5)))


def _torch_kernel(model: TinyNet) -> None:
    model.get_submodule(LINEARS[0]).use_kernel(KERNELS[Backend.DENSE])


@pytest.mark.parametrize(
    ("change", "dtype"),
    [
        (lambda m: m.to(torch.bfloat16), torch.bfloat16),
        (_set_bias, torch.float32),
        (_calibrate, torch.float32),
        (_torch_kernel, torch.float32),
    ],
    ids=["to", "bias", "calibrate", "kernel"],
)
def test_a_forward_sees_what_changed_since_the_last_one(tmp_path: Path, change, dtype) -> None:
    """The row-major forward gathers its buffers once and keeps them (`_RowPlan`): a model
    changed after a forward computes what a copy that never ran computes after the same
    change."""
    model = _model(tmp_path, "dense")
    x = torch.randn(5, DIMS[0], generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        before = model(x)
        fresh = copy.deepcopy(model)
        change(model)
        change(fresh)
        got, want = model(x.to(dtype)), fresh(x.to(dtype))
    assert got.dtype == want.dtype and torch.equal(got, want)
    if change is not _torch_kernel:
        assert not torch.equal(got.float(), before)
