"""Calibrated layer packs: smoothing folded into in1 stays exact, zigzag shares out the large
channels, input groups share one transform, error compensation lowers the output error."""

from __future__ import annotations

import itertools

import pytest
import torch

from duquant_cli.config import Precision, QuantConfig, Rotation, RowRot
from duquant_cli.math.calibrated import build_calibrated_layers, fit_input_transform
from duquant_cli.math.permutation import is_permutation
from tests.helpers import dense, reference_forward, rel_err

FP = Precision(16, 16)
W4A8 = Precision(4, 8)
# (out, in, block): exact blocks, a tail block, a block larger than the layer, non power of two
SHAPES = [(24, 64, 16), (20, 40, 16), (12, 20, 32), (16, 36, 12)]
ROTATIONS = [Rotation.GREEDY, Rotation.HADAMARD, Rotation.NONE]
CASES = list(itertools.product(ROTATIONS, [RowRot.OFF, RowRot.RESTORE], [True, False], SHAPES))


def _calib(rows: int, n: int, outliers: tuple[int, ...] = (1, 5), seed: int = 0):
    """Activation rows with planted outlier channels (and their max)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g)
    for c in outliers:
        if c < n:
            x[:, c] *= 60.0
    return x, x.abs().amax(0)


def _weight(out_f: int, in_f: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))


def _cfg(**kw) -> QuantConfig:
    base = {"calibrated": True, "rotation": Rotation.GREEDY, "row_rot": RowRot.OFF}
    return QuantConfig(**(base | kw))


def _id(case) -> str:
    rot, row, perm, (o, i, b) = case
    return f"{rot.value}-{row.value}-{'perm' if perm else 'noperm'}-{o}x{i}-b{b}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_smoothing_folded_in_reproduces_the_linear_exactly(case) -> None:
    rotation, row_rot, permute, (out_f, in_f, block) = case
    cfg = _cfg(precision=FP, block=block, rotation=rotation, row_rot=row_rot, permute=permute)
    x, amax = _calib(256, in_f)
    w = _weight(out_f, in_f)
    (lp,) = build_calibrated_layers(["l"], [w], [None], cfg, [FP], amax, x)
    t = lp.tensors
    assert "in1" in t and ("perm" in t) == permute
    assert ("in2" in t) == (rotation is not Rotation.NONE)
    assert ("out" in t) == (row_rot is not RowRot.OFF and rotation is not Rotation.NONE)
    assert all(v.dtype in (torch.float32, torch.int64) for v in t.values())
    y = reference_forward(x, t, t["weight"])
    assert rel_err(y, x @ w.mT) < 1e-5
    # the pack is not orthogonal in in1 (smoothing), but its rotations are, checked before folding
    assert lp.info["ortho_error"] < 1e-5
    assert lp.info["output_rel_error"] < 1e-5


def test_in1_is_the_smoothing_diagonal_times_an_orthogonal_rotation() -> None:
    x, amax = _calib(512, 64)
    w = _weight(32, 64)
    cfg = _cfg(precision=FP)
    t = fit_input_transform("l", x, amax, w, cfg, 0.5)
    in1 = dense(t.tensors(), "in1").double()
    r1 = torch.diag(t.s) @ in1  # undo diag(1/s)
    torch.testing.assert_close(r1 @ r1.mT, torch.eye(64, dtype=torch.float64), atol=1e-6, rtol=0)
    # one rotation matrix shared by every block
    blocks = t.tensors()["in2"]
    assert torch.equal(blocks, blocks[:1].expand_as(blocks))


def test_smoothing_and_rotation_lower_the_activation_maximum() -> None:
    x, amax = _calib(1024, 64, outliers=(3, 17))
    w = _weight(32, 64)
    t = fit_input_transform("l", x, amax, w, _cfg(), 0.5)
    info = t.info
    assert info["act_max_smoothed"] < info["act_max"]
    assert info["act_max_rotated"] < info["act_max_smoothed"]
    torch.testing.assert_close(
        torch.tensor(info["act_max_rotated"]), t.apply_x(x).abs().amax(), rtol=1e-5, atol=0
    )


def _block_counts(perm: torch.Tensor, chosen: set[int], block: int) -> list[int]:
    """How many of the `chosen` channels each block of the permuted input holds."""
    blocks = perm.numel() // block
    return [sum(int(c) in chosen for c in perm[b * block : (b + 1) * block]) for b in range(blocks)]


def test_zigzag_gives_every_block_a_fair_share_of_the_large_channels() -> None:
    """Eight large channels all planted in block 0: the permutation deals two to every block."""
    n, block = 64, 16
    x, amax = _calib(1024, n, outliers=tuple(range(8)))
    w = _weight(32, n)
    t = fit_input_transform("l", x, amax, w, _cfg(rotation=Rotation.NONE), 0.5)
    assert is_permutation(t.perm, n)
    assert _block_counts(t.perm, set(range(8)), block) == [2, 2, 2, 2]


def test_zigzag_after_the_greedy_rotation_balances_the_blocks() -> None:
    """With the greedy rotation first, the block maxima end up far more even than the input's."""
    n, block = 64, 16
    x, amax = _calib(1024, n, outliers=(0, 1, 2, 3))
    w = _weight(32, n)
    t = fit_input_transform("l", x, amax, w, _cfg(rot_steps=16), 0.5)
    scores = (x.double() / t.s).abs().amax(0)
    top = set(torch.argsort(scores, descending=True)[:4].tolist())
    assert _block_counts(torch.arange(n), top, block) == [4, 0, 0, 0]

    def spread(z: torch.Tensor) -> float:
        m = z.abs().amax(0).view(-1, block).amax(1)
        return float(m.max() / m.min())

    assert spread(t.apply_x(x)) < spread(x / t.s.float()) / 4


def test_input_group_shares_one_transform_and_stays_exact() -> None:
    x, amax = _calib(256, 48)
    ws = [_weight(o, 48, seed=o) for o in (48, 16, 16)]
    cfg = _cfg(precision=FP)
    packs = build_calibrated_layers(["q", "k", "v"], ws, [None] * 3, cfg, [FP] * 3, amax, x)
    for f in ("in1", "perm", "in2"):
        assert torch.equal(packs[0].tensors[f], packs[1].tensors[f])
        assert torch.equal(packs[0].tensors[f], packs[2].tensors[f])
        assert packs[0].tensors[f].data_ptr() != packs[1].tensors[f].data_ptr()
    for lp, w in zip(packs, ws, strict=True):
        assert rel_err(reference_forward(x, lp.tensors, lp.tensors["weight"]), x @ w.mT) < 1e-5


def test_error_compensation_lowers_the_output_error() -> None:
    x, amax = _calib(1024, 64)
    w = _weight(48, 64)
    errs = {}
    for gptq in (False, True):
        cfg = _cfg(gptq=gptq)
        (lp,) = build_calibrated_layers(["l"], [w], [None], cfg, [W4A8], amax, x)
        errs[gptq] = lp.info["output_rel_error"]
    assert errs[True] < errs[False]


def test_mixed_precisions_in_one_group() -> None:
    x, amax = _calib(256, 32)
    ws = [_weight(16, 32, seed=s) for s in (1, 2, 3)]
    precs = [W4A8, Precision(8, 8), FP]
    cfg = _cfg(gptq=True)
    packs = build_calibrated_layers(["a", "b", "c"], ws, [None] * 3, cfg, precs, amax, x)
    assert packs[0].tensors["qweight"].shape == (16, 16)  # two 4-bit codes per byte
    assert packs[1].tensors["qweight"].shape == (16, 32)
    assert "weight" in packs[2].tensors
    assert packs[1].info["output_rel_error"] < packs[0].info["output_rel_error"]
