"""DuQuantLinear against nn.Linear (unquantized) and against the pack-format equation."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from duquant_cli.config import Precision, Rotation, RowRot, Scheme
from duquant_cli.errors import MismatchError
from duquant_cli.formats.pack import Pack
from duquant_cli.math.bitpack import unpack_codes
from duquant_cli.math.quantize import dequantize
from duquant_cli.runtime import layer as layer_mod
from duquant_cli.runtime.backends import KERNELS, Backend, kernel_for, rows_eagerly
from duquant_cli.runtime.calibrate import calibrating
from duquant_cli.runtime.layer import DuQuantLinear, entry_problems
from duquant_cli.runtime.loader import load_packed
from tests.helpers import dense, rel_err
from tests.runtime.util import (
    LINEARS,
    W16A16,
    TinyNet,
    clone_model,
    make_pack,
    reference_layer,
    tiny_stats,
)

CASES = list(
    itertools.product(
        [Rotation.HADAMARD, Rotation.SVD, Rotation.NONE],
        [RowRot.RESTORE, RowRot.OFF, RowRot.PROPAGATE],
        [True, False],
        [(40, 56, 24), (32, 64, 16)],  # tails at block 16 / block_out 12; only full blocks
    )
)


def _id(case) -> str:
    rot, row, perm, dims = case
    return f"{rot.value}-{row.value}-{'perm' if perm else 'noperm'}-{'x'.join(map(str, dims))}"


def _x(n: int, rows: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, rows // 2, n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_w16a16_reproduces_linear(tmp_path: Path, case) -> None:
    rotation, row_rot, permute, dims = case
    block_out = 12 if dims[0] == 40 else None
    base = TinyNet(dims=dims)
    out = make_pack(
        tmp_path, base, precision=W16A16, rotation=rotation, row_rot=row_rot, permute=permute,
        block_out=block_out,
    )  # fmt: skip
    model = clone_model(base, dims=dims)
    report = load_packed(model, out, backend="dense")
    assert sorted(report.replaced) == sorted(LINEARS)
    pack = Pack.open(out)
    for name in LINEARS:
        lin, dq = base.get_submodule(name), model.get_submodule(name)
        assert isinstance(dq, DuQuantLinear)
        x = _x(lin.in_features)
        with torch.no_grad():
            want = lin(x).double()
            got = dq(x)
        assert got.shape == want.shape and got.dtype == torch.float32
        rotated = row_rot is RowRot.PROPAGATE and rotation is not Rotation.NONE
        assert dq.output_rotated == rotated
        if rotated:  # propagate: the layer returns y R^T (bias rotated too)
            want = want @ dense(pack.load(name), "out").double().mT
        assert rel_err(got, want) < 1e-5, name
    if row_rot is not RowRot.PROPAGATE or rotation is Rotation.NONE:
        x = _x(dims[0])
        with torch.no_grad():
            assert rel_err(model(x), base(x)) < 1e-5


@pytest.mark.parametrize("row_rot", [RowRot.RESTORE, RowRot.OFF])
def test_activation_aware_w16a16_reproduces_linear(tmp_path: Path, row_rot: RowRot) -> None:
    """Calibrated packs add in1 (smoothing folded into a rotation, not orthogonal)."""
    base = TinyNet()
    out = make_pack(
        tmp_path, base, stats=tiny_stats(base), precision=W16A16, row_rot=row_rot,
        calibrated=True, rotation=Rotation.GREEDY,
    )  # fmt: skip
    model = clone_model(base)
    load_packed(model, out, verify_source=True, backend="dense")
    assert all(model.get_submodule(n).in1 is not None for n in LINEARS)
    x = _x(40)
    with torch.no_grad():
        assert rel_err(model(x), base(x)) < 1e-5


@pytest.mark.parametrize("backend", ["dense", "int8"])
def test_a_smoothed_first_transform_runs_as_row_scales_and_one_matrix(
    tmp_path: Path, backend: str
) -> None:
    """A calibrated in1 is diag(1/s_k) R1 per block: the layer keeps its row scales
    (s_0 / s_k) and runs it as one product and one mm, computing what the blockwise bmm does."""
    base = TinyNet(dims=(64, 48, 32))
    out = make_pack(tmp_path, base, stats=tiny_stats(base), calibrated=True)
    model = clone_model(base, dims=(64, 48, 32))
    load_packed(model, out, backend=backend)
    layer = model.blocks[0]["up"]
    s = layer.in1_row_scales
    assert s is not None and s.shape == (4, 16) and layer.inputs_shared
    assert (s.abs() - 1).abs().max() > 0.1  # scales, not signs
    torch.testing.assert_close(s.unsqueeze(-1) * layer.in1[0], layer.in1, rtol=1e-5, atol=0)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ops = _ops(lambda: layer(x))
        shared = layer(x)
        layer.in1_row_scales = None  # the blockwise form
        blockwise = layer(x)
    if layer.kernel.rows:  # oneDNN: row-major, one mm per shared transform
        assert "aten::bmm" not in ops, ops
    assert rel_err(shared, blockwise) < 1e-5


QUANT_CASES = {
    "w4a8": {},
    "w4a8-asym-act-clip": {"act_scheme": Scheme.ASYM, "act_clip": 0.9},
    "w4a16-group8-asym-w": {
        "precision": Precision(4, 16), "group_size": 8, "weight_scheme": Scheme.ASYM,
    },
    "w8a8-propagate": {"precision": Precision(8, 8), "row_rot": RowRot.PROPAGATE},
    "w3a6-svd-off": {"precision": Precision(3, 6), "rotation": Rotation.SVD, "row_rot": RowRot.OFF},
}  # fmt: skip


@pytest.mark.parametrize("cfg", list(QUANT_CASES.values()), ids=list(QUANT_CASES))
def test_quantized_layer_matches_pack_equation(tmp_path: Path, cfg: dict) -> None:
    base = TinyNet()
    out = make_pack(tmp_path, base, **cfg)
    model = clone_model(base)
    load_packed(model, out, backend="dense")
    pack = Pack.open(out)
    for name in LINEARS:
        dq = model.get_submodule(name)
        x = _x(dq.in_features, rows=64).reshape(-1, dq.in_features)
        with torch.no_grad():
            got = dq(x)
            want = reference_layer(x, pack.load(name), dq, base.get_submodule(name).bias)
        # the reference quantizes x after float64 dense transforms: a rare rounding flip apart,
        # both are the same numbers
        assert rel_err(got, want) < 2e-3, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "cfg",
    [{}, {"weight_scheme": Scheme.ASYM, "group_size": 8}, {"precision": Precision(3, 8)}],
    ids=["sym", "asym-group8", "w3"],
)
@pytest.mark.parametrize("row_rot", [RowRot.OFF, RowRot.RESTORE])
def test_dense_weight_is_codes_times_scales_with_the_restore_folded_in(
    tmp_path: Path, dtype, cfg, row_rot
) -> None:
    """Without a restore, bit-identical to codes x scales cast to the dtype. With one, the
    layer keeps no output blocks and its weight is blockdiag(out)^T (codes x scales): here in
    float64, there in float32 sums, then cast (within one rounding step of the dtype)."""
    base = TinyNet()
    out = make_pack(tmp_path, base, row_rot=row_rot, **cfg)
    model = clone_model(base)
    load_packed(model, out, dtype=dtype, backend="dense")
    pack = Pack.open(out)
    for name in LINEARS:
        t, entry = pack.load(name), pack.layers[name]
        bits = entry.precision.w_bits
        codes = unpack_codes(t["qweight"], bits, entry.in_features)
        w = dequantize(codes, t["scale"], t.get("zero"), bits)
        layer = model.get_submodule(name)
        got = layer.plain_weight
        assert got.dtype == dtype and layer.out is None and layer.out_tail is None, name
        # float32 and bfloat16 on CPU: the same weight, prepacked once for oneDNN
        assert layer.kernel is kernel_for(Backend.DENSE, torch.device("cpu"), dtype)
        if row_rot is RowRot.OFF:
            assert torch.equal(got, w.to(dtype)), name
            continue
        want = dense(t, "out").double().T @ w.double()
        err = (got.double() - want).abs()
        assert (err <= torch.finfo(dtype).eps * want.abs() + 1e-7 * want.abs().max()).all(), name
        assert not torch.equal(got, w.to(dtype)), name


@pytest.mark.parametrize(
    ("cast", "dtype"),
    [
        (lambda m: m.to(torch.bfloat16), torch.bfloat16),
        (lambda m: m.half(), torch.float16),
        (lambda m: m.to(torch.float64), torch.float64),
    ],
    ids=["to-bf16", "half", "to-f64"],
)
def test_to_dtype_casts_the_weight_and_moves_float32_buffers(tmp_path: Path, cast, dtype) -> None:
    """model.to(dtype) casts the dense weight; transforms, bias and scales stay float32 with
    their exact values (moved, not round-tripped through dtype), the permutation int64."""
    base = TinyNet()
    out = make_pack(tmp_path, base)
    model = clone_model(base)
    load_packed(model, out, backend="dense")
    dq = model.blocks[0]["up"]
    w32 = dq.plain_weight.clone()
    kept = {n: b.clone() for n, b in dq.named_buffers() if n in layer_mod.FLOAT32_FIELDS}
    assert {"in2", "bias"} <= kept.keys() and dq.out is None  # restore folded into the weight
    x = _x(40)
    with torch.no_grad():
        want = model(x)
        cast(model)
        assert dq.perm.dtype == torch.int64
        assert dq.weight.dtype == dtype and dq.compute_dtype == dtype
        assert torch.equal(dq.plain_weight, w32.to(dtype))  # cast, not recomputed
        assert dq.kernel is kernel_for(Backend.DENSE, torch.device("cpu"), dtype)
        for n, b in kept.items():
            assert torch.equal(getattr(dq, n), b), n
        tol = 1e-6 if dtype == torch.float64 else 3e-2
        got = model(x.to(dtype))
        assert got.dtype == dtype and rel_err(got, want) < tol
        model.float()
        assert torch.equal(dq.plain_weight, w32.to(dtype).float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("act", ["sym", "asym", "static"])
def test_all_zero_token_gives_no_nan(tmp_path: Path, dtype, act: str) -> None:
    """Scale floors keep 0 / 0 out of every activation mode, in every model dtype."""
    base = TinyNet()
    scheme = Scheme.ASYM if act == "asym" else Scheme.SYM
    model = clone_model(base)
    load_packed(model, make_pack(tmp_path, base, act_scheme=scheme), backend="dense")
    if act == "static":  # calibrated in float32 on silence: every scale at the floor
        with calibrating(model), torch.no_grad():
            model(torch.zeros(4, 40))
        assert model.proj.act_scale.min() == layer_mod.ACT_SCALE_MIN
    model.to(dtype)
    x = torch.zeros(3, 40, dtype=dtype)
    x[1] = torch.randn(40).to(dtype)
    with torch.no_grad():
        y = model.proj(x)
    assert torch.isfinite(y).all()
    # zero in, bias out (added before the row restore, so exact up to the dtype's rounding)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y[0].float(), base.proj.bias.float(), rtol=tol, atol=tol)


def _ops(fn) -> list[str]:
    """The aten ops `fn` runs; an op called by another op (linear -> mm) is named parent/op."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = []
    for e in prof.events():
        if e.name.startswith("aten::"):
            parent = e.cpu_parent.name if e.cpu_parent is not None else ""
            names.append(f"{parent}/{e.name}" if parent.startswith("aten::") else e.name)
    return names


@pytest.mark.parametrize("dims", [(32, 64, 16), (40, 56, 24)], ids=["full-blocks", "tails"])
def test_forward_ops_one_gather_one_bmm_per_transform(tmp_path: Path, dims) -> None:
    """Channels-major forward (torch's dense kernel): a single gather (row-major), one batched
    matmul per input transform (plus an mm and a cat per tail block; the first one reads x
    transposed in place), one matmul holding the row restore, and one copy into the row-major
    output; nothing else copies an activation."""
    base = TinyNet(dims=dims)
    out = make_pack(tmp_path, base)  # w4a8 dynamic, perm + in2 + out (restore)
    model = clone_model(base, dims=dims)
    load_packed(model, out, backend="dense")
    layer = model.blocks[0]["up"]
    layer.use_kernel(KERNELS[Backend.DENSE])
    x = torch.randn(16, dims[0])
    with torch.no_grad():
        ops = _ops(lambda: layer(x))
    tails = dims[0] % 16 != 0
    assert ops.count("aten::index_select") == 1
    assert ops.count("aten::bmm") == 1  # in2
    assert ops.count("aten::mm") == 1 + (1 if tails else 0)  # the matmul, in2's tail block
    assert ops.count("aten::cat") == (1 if tails else 0)  # in2's tail
    # The output's row-major copy; no transpose copy of the input
    assert [op for op in ops if op.endswith("aten::clone")] == ["aten::contiguous/aten::clone"]


def test_autograd_and_autocast(tmp_path: Path) -> None:
    base = TinyNet()
    out = make_pack(tmp_path, base, precision=W16A16)
    model = clone_model(base)
    load_packed(model, out, backend="dense")
    x = _x(40).requires_grad_(True)
    model(x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    base(x2).square().sum().backward()
    assert rel_err(x.grad, x2.grad) < 1e-5
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x.detach())
    assert y.dtype == torch.bfloat16 and rel_err(y.float(), base(x).detach()) < 3e-2


def test_empty_batch(tmp_path: Path) -> None:
    base = TinyNet()
    model = clone_model(base)
    load_packed(model, make_pack(tmp_path, base), backend="dense")
    with torch.no_grad():
        assert model(torch.randn(0, 7, 40)).shape == (0, 7, 24)


def test_entry_problems_name_the_layer_and_field(tmp_path: Path) -> None:
    base = TinyNet()
    pack = Pack.open(make_pack(tmp_path, base))
    entry = pack.layers["proj"]
    assert entry_problems(entry) == []
    refs = dict(entry.tensors)
    refs["perm"] = refs["perm"].__class__(refs["perm"].key, (41,), "int64")
    refs["smooth"] = refs["perm"]
    del refs["qweight"]
    bad = entry.__class__(**{**entry.__dict__, "tensors": refs})
    problems = entry_problems(bad)
    assert "proj: unknown tensor 'smooth' (a pack from a newer duquant?)" in problems
    assert "proj: perm is [41], expected [40]" in problems
    assert "proj: w4 layer without qweight and scale" in problems
    tensors = pack.load("proj")
    tensors["perm"] = torch.zeros(40, dtype=torch.int64)
    with pytest.raises(MismatchError, match=r"^proj: perm is not a permutation of 40$"):
        DuQuantLinear.from_pack(entry, tensors, bias=None)


def test_from_pack_without_a_model(tmp_path: Path) -> None:
    """Built straight from a pack (as `duquant apply` does), with the checkpoint's bias."""
    base = TinyNet()
    pack = Pack.open(make_pack(tmp_path, base, precision=W16A16))
    lin = base.proj
    dq = DuQuantLinear.from_pack(pack.layers["proj"], pack.load("proj"), bias=lin.bias)
    assert isinstance(dq, nn.Module) and dq.name == "proj"
    x = _x(40)
    with torch.no_grad():
        assert rel_err(dq(x), lin(x)) < 1e-5
    assert "w16a16" in repr(dq) and "backend=dense" in repr(dq)
    auto = DuQuantLinear.from_pack(
        pack.layers["proj"], pack.load("proj"), bias=None, backend=Backend.AUTO
    )
    assert auto.backend is Backend.DENSE and auto.backend_reason.startswith("auto: dense")


@pytest.mark.parametrize("backend", ["dense", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_output_is_contiguous_and_views_like_nn_linear(tmp_path: Path, backend, dtype) -> None:
    """Models `.view()` a linear layer's output (attention heads): it must be contiguous, with
    the layer's dtype, whatever the backend's internal dtype."""
    base = TinyNet()
    model = clone_model(base).to(dtype)
    load_packed(model, make_pack(tmp_path, base), backend=backend)
    x = torch.randn(2, 5, 40, dtype=dtype)
    with torch.no_grad():
        y = model.blocks[0]["up"](x)
    assert y.is_contiguous() and y.dtype == dtype and y.shape == (2, 5, 56)
    assert y.view(2, 5, 7, 8).shape == (2, 5, 7, 8)


@pytest.mark.parametrize("n", [2048, 48, 50])
def test_token_min_max_is_the_plain_reduction_at_any_token_count(n: int) -> None:
    """The folded reduction (fast at token counts like 16 or 48) gives the plain one's values,
    also where `in` does not divide into the fold (50)."""
    gen = torch.Generator().manual_seed(n)
    for t in (1, 2, 3, 16, 24, 48, 64, 100):
        h = torch.randn(n, t, generator=gen)
        lo, hi = layer_mod._token_min_max(h)
        assert torch.equal(lo, h.amin(0, keepdim=True)), t
        assert torch.equal(hi, h.amax(0, keepdim=True)), t


@pytest.mark.parametrize("act_asym", [False, True], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_dense_forward_is_per_token_at_every_token_count(
    tmp_path: Path, dtype: torch.dtype, act_asym: bool
) -> None:
    """Few tokens run the matmul in nn.Linear's operand order, more run it weight-first: each
    token's output is the one it gets alone (one token, weight-first GEMV) at any count, a
    rounding flip apart (one token sums the block products elementwise, more in a bmm)."""
    base = TinyNet(dims=(64, 96, 32))
    model = clone_model(base, dims=(64, 96, 32)).to(dtype)
    load_packed(model, make_pack(tmp_path, base), backend="dense")
    layer = model.blocks[0]["up"]
    layer.act_asym = act_asym
    gen = torch.Generator().manual_seed(3)
    tol = 2e-3 if dtype == torch.float32 else 2e-2
    for t in (2, 5, 16, 24, 64, 70):
        x = torch.randn(t, 64, generator=gen).to(dtype)
        with torch.no_grad():
            y = layer(x)
            alone = torch.cat([layer(x[i : i + 1]) for i in range(t)])
        assert y.shape == (t, 96) and y.is_contiguous()
        assert rel_err(y.float(), alone.float()) < tol, t


def test_when_the_eager_dense_forward_runs_row_major() -> None:
    for shared in (True, False):
        assert rows_eagerly(torch.bfloat16, 64, 4096, shared)
        assert not rows_eagerly(torch.bfloat16, 64, 2048, shared)  # weight-first there
        assert not rows_eagerly(torch.float32, 64, 4096, shared)
        assert not rows_eagerly(torch.bfloat16, 1, 4096, shared)
    assert rows_eagerly(torch.float16, 16, 2048, True)
    assert not rows_eagerly(torch.bfloat16, 16, 2048, False)


@pytest.mark.parametrize("rotation", [Rotation.HADAMARD, Rotation.SVD])
@pytest.mark.parametrize("tokens", [16, 64])
def test_half_precision_layers_run_row_major(
    tmp_path: Path, rotation, tokens: int, torch_prep
) -> None:
    """bfloat16 with 4096 inputs, at 16 tokens where the input blocks share one matrix and at
    64: the eager forward runs row-major (a gather of x's bits, nn.Linear's matmul order, a
    shared block matrix as one mm) and computes what the channels-major forward does."""
    base = nn.Sequential(nn.Linear(4096, 24))
    model = nn.Sequential(nn.Linear(4096, 24))
    model.load_state_dict(base.state_dict())
    load_packed(model, make_pack(tmp_path, base, rotation=rotation, block_out=8), backend="dense")
    model.to(torch.bfloat16)
    layer = model[0]
    layer.use_kernel(KERNELS[Backend.DENSE])  # torch's kernel (oneDNN's always runs row-major)
    shared = rotation is Rotation.HADAMARD
    assert layer.inputs_shared == shared
    assert (layer.in2_row_scales is not None) == shared and layer.out is None
    if shared:  # one Hadamard matrix, each block with its own random row signs
        assert layer.in2_row_scales.shape == (256, 16) and (layer.in2_row_scales < 0).any()
        assert layer.in2_row_scales.dtype == torch.float32  # kept by model.to(bfloat16)
        assert "in2_row_scales" not in layer.state_dict()
    x = torch.randn(tokens, 4096, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    with torch.no_grad():
        ops = _ops(lambda: layer(x))
        rows = layer(x)
        layer.observer = lambda *args: None  # an observer keeps the channels-major path
        channels = layer(x)
        layer.observer = None
    assert rows.is_contiguous() and rows.dtype == torch.bfloat16
    assert rel_err(rows.float(), channels.float()) < 1e-2
    if not shared and tokens < 48:  # channels-major already
        assert ops.count("aten::index_select") == 1, ops
        return
    assert ops.count("aten::gather") == 1 and "aten::index_select" not in ops, ops
    assert ops.count("aten::bmm") == (0 if shared else 1), ops
    assert ops.count("aten::mm") == (2 if shared else 1), ops
    assert not [op for op in ops if op.endswith("aten::clone")], ops
    # Under autograd (no bit view there) the same values, and a gradient.
    xg = x.clone().requires_grad_(True)
    y = layer(xg)
    y.float().sum().backward()
    assert torch.equal(y.detach(), rows)
    assert xg.grad is not None and torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["dense", "int8"])
def test_one_token_uses_the_block_signs(tmp_path: Path, backend: str) -> None:
    """Every backend keeps the signs of a Hadamard pack; one token runs each block transform as
    a sign flip and one mm, and computes what the blockwise products do."""
    base = nn.Sequential(nn.Linear(256, 64))
    m = nn.Sequential(nn.Linear(256, 64))
    load_packed(m, make_pack(tmp_path, base, block_out=8), backend=backend)
    layer = m[0]
    layer.use_kernel(KERNELS[layer.backend])  # torch's kernels: the matmul is an mm for dense
    assert layer.in2_row_scales is not None
    assert (layer.out_row_scales is not None) == (backend == "int8")  # dense folds the restore
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ops = _ops(lambda: layer(x))
        signed = layer(x)
        layer.in2_row_scales = layer.out_row_scales = None
        blockwise = layer(x)
    assert ops.count("aten::mm") == 2, ops  # in2; dense's matmul or int8's restore
    assert "aten::sum" not in ops, ops
    assert rel_err(signed, blockwise) < 1e-4


def test_shared_blocks_are_found_again_after_loading_a_state_dict(tmp_path: Path) -> None:
    """A state dict with blocks of another kind (one matrix per block) loaded into a layer whose
    blocks were shared: the layer runs the loaded blocks, as the model they came from does."""
    base = nn.Sequential(nn.Linear(4096, 24))
    models = {}
    for rot in (Rotation.HADAMARD, Rotation.SVD):
        m = nn.Sequential(nn.Linear(4096, 24))
        m.load_state_dict(base.state_dict())
        load_packed(m, make_pack(tmp_path, base, name=rot.value, rotation=rot), backend="dense")
        models[rot] = m.to(torch.bfloat16)
    had, svd = models[Rotation.HADAMARD], models[Rotation.SVD]
    assert had[0].inputs_shared and not svd[0].inputs_shared
    had.load_state_dict(svd.state_dict())
    assert not had[0].inputs_shared and had[0].in2_row_scales is None
    x = torch.randn(16, 4096, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(had(x), svd(x))


@pytest.mark.parametrize("act_asym", [False, True], ids=["sym", "asym"])
def test_backward_through_dynamic_activation_quantization(tmp_path: Path, act_asym: bool) -> None:
    """With autograd on, nothing its backward reads is changed in place (the per-token min and
    max included), and the forward gives what it gives without autograd."""
    base = TinyNet(dims=(64, 96, 32))
    model = clone_model(base, dims=(64, 96, 32))
    load_packed(model, make_pack(tmp_path, base), backend="dense")
    layer = model.blocks[0]["up"]
    layer.act_asym = act_asym
    for t in (1, 5, 64):
        x = torch.randn(t, 64, generator=torch.Generator().manual_seed(t))
        with torch.no_grad():
            want = layer(x)
        xg = x.clone().requires_grad_(True)
        y = layer(xg)
        y.sum().backward()
        assert torch.equal(y.detach(), want), t
        assert xg.grad is not None and torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0
