"""The fused activation path (`runtime/prep.c`): what torch's ops compute, on every layout a pack
gives it (shared and distinct blocks, tails, block sizes, smoothing, clipping, both dtypes, codes
and scaled-back activations, one thread and several); torch's ops wherever it cannot run; and a
library that is built once, atomically, and refused when it does not agree."""

from __future__ import annotations

import logging
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from duquant_cli.commands.pack import CALIBRATED_DEFAULTS
from duquant_cli.config import Precision, Rotation, Scheme
from duquant_cli.runtime import prep
from duquant_cli.runtime.backends import KERNELS, Backend
from duquant_cli.runtime.layer import DuQuantLinear
from duquant_cli.runtime.loader import load_packed
from duquant_cli.runtime.status import status
from tests.runtime.util import LINEARS, TinyNet, clone_model, make_pack, tiny_stats

pytestmark = pytest.mark.skipif(prep.library() is None, reason="no C compiler here")
# 136 and 272 inputs at block 16: 8 and 17 blocks (the vector path in groups of 8, then single
# blocks) and a tail of 8 channels where 136 does not divide.
DIMS = (136, 272, 24)
PACKS = {
    "hadamard": {},  # one matrix with row signs, a zigzag permutation
    "svd": {"rotation": Rotation.SVD},  # a distinct matrix per block
    "block8": {"block": 8},  # the plain C path
    "calibrated": CALIBRATED_DEFAULTS,  # smoothing folded into in1 (row scales), greedy blocks
    "clipped": {"act_clip": 0.5, "act_scheme": Scheme.SYM},  # codes clamped
}


def _model(tmp_path: Path, kind: str, backend: str, dtype=torch.float32) -> TinyNet:
    base = TinyNet(dims=DIMS)
    stats = tiny_stats(base) if kind == "calibrated" else None
    model = clone_model(base, dims=DIMS).to(dtype)
    load_packed(model, make_pack(tmp_path, base, stats=stats, **PACKS[kind]), backend=backend)
    return model


def _both(layer: DuQuantLinear, x: torch.Tensor):
    """(fused, torch ops): the quantized activations and per-token scales of one input."""
    plan = layer._row_plan(False)
    assert plan.prep is not None
    with torch.no_grad():
        fused = plan.prep(x)
        ops = layer._quantize_rows(x, plan, False)
    return fused, ops


@pytest.mark.parametrize("kind", list(PACKS))
@pytest.mark.parametrize("backend", ["dense", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 80])
def test_fused_activations_are_torch_ops(tmp_path: Path, kind, backend, dtype, tokens) -> None:
    """Every layer: the same per-token scales, and the same activations but where a block
    product summed in another order lands on the other side of a rounding boundary: one
    quantization step, at a few of the entries at most."""
    model = _model(tmp_path, kind, backend, dtype)
    gen = torch.Generator().manual_seed(tokens)
    for name in LINEARS:
        layer = model.get_submodule(name)
        x = (torch.randn(tokens, layer.in_features, generator=gen) * 2).to(dtype)
        x[:, 5] *= 40  # an outlier channel
        (h, scale), (want, want_scale) = _both(layer, x)
        if backend == "int8":
            assert h.dtype == torch.uint8 and scale.shape == (tokens, 1)
            assert torch.allclose(scale, want_scale, rtol=1e-6, atol=0)
            diff, step = h.float() - 128 - want, torch.ones(())
        else:
            assert h.dtype == dtype and scale is None and want_scale is None
            # Equal codes give values equal to a rounding of the scale (which may differ in its
            # last bit); a step is at most the token's largest value / 127.
            diff = h.float() - want.to(dtype).float()
            step = want.float().abs().amax(1, keepdim=True) / 127 * 1.01
        assert (diff.abs() <= step).all(), name
        assert (diff.abs() > 1e-3 * step).float().mean() <= 0.01, name


@pytest.mark.parametrize(
    ("kind", "backend"), [("calibrated", "dense"), ("hadamard", "int8"), ("svd", "int8")]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layers_run_fused_and_compute_what_torch_ops_do(
    tmp_path: Path, monkeypatch, kind: str, backend: str, dtype
) -> None:
    """Whole model forwards, fused against torch ops (the same packs and kernels), with the
    rows split over threads (80 tokens x 272 inputs) and without: dense, and int8 with its
    fused tail (scale, bias, row restore of shared or distinct blocks, cast); and `status`
    says which path runs."""
    model = _model(tmp_path, kind, backend, dtype)
    assert {r["prep"] for r in status(model)} == {"fused"}
    if backend == "int8":
        assert all(model.get_submodule(n)._row_plan(False).finish is not None for n in LINEARS)
        assert model.proj.out is not None and model.proj.bias is not None
    x = torch.randn(80, DIMS[0], generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        fused = model(x)
        monkeypatch.setattr(prep, "library", lambda: None)
        for name in LINEARS:
            model.get_submodule(name).__dict__.pop("_plan")
        assert {r["prep"] for r in status(model)} == {"torch ops"}
        ops = model(x)
    assert fused.dtype == ops.dtype == dtype
    tol = 1e-3 if dtype == torch.float32 else 1e-2
    assert ((fused.float() - ops.float()).norm() / ops.float().norm()).item() < tol


def test_layers_called_from_two_threads(tmp_path: Path) -> None:
    """Each call has its own arguments: two threads running the same layers get what one
    thread gets."""
    model = _model(tmp_path, "hadamard", "int8")
    xs = [torch.randn(7, DIMS[0], generator=torch.Generator().manual_seed(i)) for i in range(40)]
    with torch.no_grad():
        want = [model(x) for x in xs]
        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(model, xs))
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_where_the_fused_path_does_not_run(tmp_path: Path, torch_prep) -> None:
    """Without the library every layer runs torch's ops (and computes)."""
    model = _model(tmp_path, "hadamard", "dense")
    assert {r["prep"] for r in status(model)} == {"torch ops"}
    assert model(torch.randn(3, DIMS[0])).isfinite().all()


@pytest.mark.parametrize(
    "why",
    ["float16", "asymmetric", "static", "autograd", "observer", "w4a16", "torch kernel", "off"],
)
def test_layers_the_fused_path_leaves_to_torch_ops(tmp_path: Path, why: str) -> None:
    """What the C code does not do runs torch's ops: float16 (it reads and writes float32 and
    bfloat16), asymmetric or static activations, unquantized activations, an input that needs
    a gradient, calibration, int8 on torch's own (channels-major) kernel; and a layer told not
    to (`use_fused = False`)."""
    cfg = {"act_scheme": Scheme.ASYM} if why == "asymmetric" else {}
    if why == "w4a16":
        cfg["precision"] = Precision.parse("w4a16")
    base = TinyNet(dims=DIMS)
    model = clone_model(base, dims=DIMS)
    dtype = torch.float16 if why == "float16" else torch.float32
    load_packed(model, make_pack(tmp_path, base, **cfg), backend="dense", dtype=dtype)
    layer = model.get_submodule(LINEARS[0])
    x = torch.randn(5, DIMS[0], dtype=dtype)
    if why == "static":
        layer.act_scale = torch.ones(DIMS[0])
        layer.act_mode = "static"
    if why == "observer":
        layer.observer = lambda *args: None
    if why == "torch kernel":
        model = _model(tmp_path, "hadamard", "int8")
        layer = model.get_submodule(LINEARS[0])
        layer.use_kernel(KERNELS[Backend.INT8])
    if why == "off":
        assert layer.fused
        layer.use_fused = False
    if why == "autograd":
        assert layer.fused
        xg = x.clone().requires_grad_(True)
        layer(xg).sum().backward()
        assert xg.grad is not None and xg.grad.abs().sum() > 0
        return
    assert not layer.fused
    assert layer(x).isfinite().all()


def test_the_library_is_built_once_into_the_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(prep, "cache_dir", lambda: tmp_path)
    lib = prep.library.__wrapped__()
    assert lib is not None
    built = list(tmp_path.glob("prep-*.so"))
    assert len(built) == 1 and not list(tmp_path.glob("tmp*"))  # no temporary file left
    stamp = built[0].stat().st_mtime_ns
    assert prep.library.__wrapped__() is not None
    assert built[0].stat().st_mtime_ns == stamp  # loaded, not built again


def test_a_failed_build_falls_back(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(prep, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(prep, "FLAGS", ("-fno-such-flag-anywhere", *prep.FLAGS))
    with caplog.at_level(logging.INFO, logger="duquant"):
        assert prep.library.__wrapped__() is None
    assert "prep.c did not build" in caplog.text
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_a_library_that_disagrees_is_refused(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(prep, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(prep, "_agrees", lambda lib: False)
    assert prep.library.__wrapped__() is None
    assert "disagrees" in caplog.text


@pytest.mark.parametrize(("kind", "backend"), [("calibrated", "dense"), ("svd", "int8")])
def test_compiled_layers_call_the_fused_code(tmp_path: Path, kind: str, backend: str) -> None:
    """Under torch.compile (fullgraph, any token count) each layer is one opaque op running
    its eager fused forward: the compiled model gives eager's bits, and after a buffer changes
    in place, or is replaced, it follows the change."""
    torch._dynamo.reset()
    model = _model(tmp_path, kind, backend, torch.bfloat16)
    graphs = []

    def capture(gm, inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=capture, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for tokens in (3, 40):
            x = torch.randn(tokens, DIMS[0], generator=torch.Generator().manual_seed(tokens))
            assert torch.equal(compiled(x.bfloat16()), model(x.bfloat16()))
        targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
        # One op a layer, the layer's eager fused forward (with dynamic shapes, a graph for
        # the first call and one for the second)
        assert targets.count("duquant.fused_rows.default") == len(LINEARS) * len(graphs)
        model.proj.in2.mul_(-1)  # in place: the same tensor, new values
        x = torch.randn(3, DIMS[0]).bfloat16()
        want = model(x)
        assert torch.equal(compiled(x), want)
        model.proj.in2 = -model.proj.in2  # a new tensor: the old values again
        assert torch.equal(compiled(x), model(x)) and not torch.equal(model(x), want)


def test_an_unwritable_cache_falls_back(tmp_path: Path, monkeypatch) -> None:
    """A cache folder that cannot be made (a file in its way): torch ops, not an error."""
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(prep, "cache_dir", lambda: tmp_path / "file" / "kernels")
    assert prep.library.__wrapped__() is None


def test_loading_and_serving_do_not_import_the_compiler() -> None:
    """Importing the runtime and loading the fused library leave torch._dynamo unimported: its
    import costs about a second, and only torch.compile needs it."""
    code = (
        "import sys, torch; from duquant_cli.runtime import loader, prep; "
        "assert prep.library() is not None; "
        "print('torch._dynamo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
