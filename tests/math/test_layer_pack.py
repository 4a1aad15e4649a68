"""build_layer against a reference runtime written from layer_pack's docstring."""

from __future__ import annotations

import itertools

import pytest
import torch

from duquant_cli.config import Precision, QuantConfig, Rotation, RowRot, Scheme
from duquant_cli.errors import TransformError
from duquant_cli.math import layer_pack
from duquant_cli.math.bitpack import packed_cols
from duquant_cli.math.blocks import BlockDiag
from duquant_cli.math.layer_pack import BLOCK_FIELDS, build_layer, layer_generator
from duquant_cli.math.permutation import is_permutation
from tests.helpers import dense, reference_dequant, reference_forward, rel_err, untransform_weight

FP = Precision(16, 16)
# (out, in, block, block_out): exact blocks, tails on both sides, block larger than the dims,
# non powers of two (DCT), a separate row block.
SHAPES = [
    (32, 32, 8, None),
    (24, 40, 16, None),
    (12, 20, 32, None),
    (20, 48, 12, None),
    (30, 36, 8, 7),
]
ROTATIONS = [Rotation.HADAMARD, Rotation.SVD, Rotation.NONE]
ROW_ROTS = [RowRot.RESTORE, RowRot.PROPAGATE, RowRot.OFF]
CASES = list(itertools.product(ROTATIONS, ROW_ROTS, [True, False], SHAPES))


def _layer(out_f: int, in_f: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    w[:, 1] *= 20  # outlier input channel
    w[3] *= 5  # outlier output row
    return w, torch.randn(out_f, generator=g)


def _id(case) -> str:
    rot, row, perm, (o, i, b, bo) = case
    return f"{rot.value}-{row.value}-{'perm' if perm else 'noperm'}-{o}x{i}-b{b}-bo{bo}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_unquantized_transforms_reproduce_linear(case) -> None:
    rotation, row_rot, permute, (out_f, in_f, block, block_out) = case
    cfg = QuantConfig(
        precision=FP, block=block, block_out=block_out, rotation=rotation, row_rot=row_rot,
        permute=permute,
    )  # fmt: skip
    w, b = _layer(out_f, in_f)
    lp = build_layer("model.layers.0.proj", w, b, cfg, FP)
    t = lp.tensors

    # which fields exist follows from the config
    rotates = rotation is not Rotation.NONE
    assert ("perm" in t) == permute
    assert ("in2" in t) == rotates
    assert ("out" in t) == (rotates and row_rot is not RowRot.OFF)
    assert ("bias" in t) == (rotates and row_rot is RowRot.PROPAGATE)
    assert "in1" not in t and "qweight" not in t
    assert t["weight"].dtype == torch.float32 and t["weight"].shape == (out_f, in_f)
    if rotates:
        bi, bo = min(block, in_f), min(block_out or block, out_f)
        assert t["in2"].shape == (in_f // bi, bi, bi)
        assert ("in2_tail" in t) == bool(in_f % bi)
        if "out" in t:
            assert t["out"].shape == (out_f // bo, bo, bo)
            assert ("out_tail" in t) == bool(out_f % bo)

    x = torch.randn(2, 3, in_f, generator=torch.Generator().manual_seed(1))
    y_ref = x @ w.mT
    y_prime = reference_forward(x, {k: v for k, v in t.items() if k != "out"}, t["weight"])
    if row_rot is RowRot.PROPAGATE and "out" in t:
        # propagate: the next layer sees the rotated output, with the stored rotated bias
        rot = dense(t, "out")
        assert rel_err(y_prime + t["bias"], (y_ref + b) @ rot.mT) < 1e-5
        assert rel_err((y_prime + t["bias"]) @ rot, y_ref + b) < 1e-5
    else:
        y = reference_forward(x, t, t["weight"])
        assert rel_err(y, y_ref) < 1e-5
        assert rel_err(y + b, y_ref + b) < 1e-5
    if row_rot is not RowRot.PROPAGATE:
        assert rel_err(untransform_weight(t, t["weight"]), w) < 1e-5


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_stored_transforms_are_orthogonal_float32(case) -> None:
    rotation, row_rot, permute, (out_f, in_f, block, block_out) = case
    cfg = QuantConfig(
        precision=FP, block=block, block_out=block_out, rotation=rotation, row_rot=row_rot,
        permute=permute,
    )  # fmt: skip
    w, b = _layer(out_f, in_f, seed=2)
    lp = build_layer("l", w, b, cfg, Precision(4, 8))
    for name in BLOCK_FIELDS:
        for key in (name, name + "_tail"):
            if key not in lp.tensors:
                continue
            m = lp.tensors[key]
            assert m.dtype == torch.float32, key
            m = m.double() if m.dim() == 3 else m.double()[None]
            eye = torch.eye(m.shape[-1], dtype=torch.float64)
            assert float((m @ m.mT - eye).abs().amax()) < 1e-5, key
    if permute:
        assert is_permutation(lp.tensors["perm"], in_f)
        assert lp.tensors["perm"].dtype == torch.int64
    assert lp.info["ortho_error"] < 1e-5


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("group_size", [None, 8])
def test_quantized_layer_fields_and_error(bits: int, asym: bool, group_size: int | None) -> None:
    out_f, in_f = 24, 40
    cfg = QuantConfig(
        weight_scheme=Scheme.ASYM if asym else Scheme.SYM, group_size=group_size, block=16
    )
    w, b = _layer(out_f, in_f, seed=3)
    prec = Precision(bits, 8)
    lp = build_layer("q", w, b, cfg, prec)
    t = lp.tensors
    groups = in_f // (group_size or in_f)
    assert "weight" not in t
    assert t["qweight"].dtype == torch.uint8
    assert t["qweight"].shape == (out_f, packed_cols(in_f, bits))
    assert t["scale"].dtype == torch.float32 and t["scale"].shape == (out_f, groups)
    assert ("zero" in t) == asym
    if asym:
        assert t["zero"].dtype == torch.uint8 and t["zero"].shape == (out_f, groups)
    w_prime = reference_dequant(t, bits, in_f)
    # orthogonal transforms keep norms: the recorded error (in the transformed basis) equals
    # the error of the un-transformed dequantized weight against the original
    exact = untransform_weight(t, w_prime)  # what the runtime effectively multiplies by
    err = rel_err(exact, w)
    assert lp.info["weight_rel_error"] == pytest.approx(err, rel=1e-3, abs=1e-6)
    limit = {2: 0.8, 4: 0.2, 8: 0.02}[bits]
    assert err < limit
    x = torch.randn(5, in_f, generator=torch.Generator().manual_seed(4))
    assert rel_err(reference_forward(x, t, w_prime), x @ w.mT) < limit


def test_rotation_lowers_quantization_error_on_outliers() -> None:
    """The point of the transforms: an outlier channel costs less after rotation + zigzag."""
    w, _ = _layer(64, 64, seed=5)
    w[:, 7] *= 10
    prec = Precision(4, 8)
    plain = build_layer("l", w, None, QuantConfig(rotation=Rotation.NONE, permute=False), prec)
    rotated = build_layer("l", w, None, QuantConfig(), prec)
    assert rotated.info["weight_rel_error"] < plain.info["weight_rel_error"]


def test_deterministic_by_seed_and_name() -> None:
    w, b = _layer(24, 40, seed=6)
    cfg = QuantConfig()
    a = build_layer("a", w, b, cfg, Precision(4, 8)).tensors
    a2 = build_layer("a", w, b, cfg, Precision(4, 8)).tensors
    other = build_layer("other", w, b, cfg, Precision(4, 8)).tensors
    reseeded = build_layer("a", w, b, QuantConfig(seed=1), Precision(4, 8)).tensors
    assert a.keys() == a2.keys()
    assert all(torch.equal(a[k], a2[k]) for k in a)
    assert not torch.equal(a["in2"], other["in2"])
    assert not torch.equal(a["in2"], reseeded["in2"])
    g1, g2 = layer_generator(0, "x"), layer_generator(0, "x")
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


def test_accepts_half_precision_weights() -> None:
    w, b = _layer(16, 24, seed=7)
    lp = build_layer("h", w.bfloat16(), b.bfloat16(), QuantConfig(precision=FP), FP)
    assert lp.tensors["weight"].dtype == torch.float32
    x = torch.randn(3, 24)
    assert (
        rel_err(reference_forward(x, lp.tensors, lp.tensors["weight"]), x @ w.bfloat16().float().mT)
        < 1e-5
    )


def test_non_orthogonal_transform_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def skewed(kind, w_cols, block, gen):
        n = w_cols.shape[1]
        return BlockDiag(torch.eye(n, dtype=torch.float64)[None] * 1.01)

    monkeypatch.setattr(layer_pack, "rotation_blocks", skewed)
    with pytest.raises(TransformError, match="in2 transform is not orthogonal"):
        build_layer("bad", torch.randn(8, 8), None, QuantConfig(), Precision(4, 8))
