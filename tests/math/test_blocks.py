"""Block-diagonal matrices: shapes, application, inverses, orthogonality check, row scales."""

from __future__ import annotations

import pytest
import torch

from duquant_cli.math.blocks import (
    BlockDiag,
    apply_blocks,
    apply_blocks_rows,
    block_row_scales,
    orthogonality_error,
    split_sizes,
    stack_blocks,
)
from duquant_cli.math.rotations import random_orthogonal


def _dense(bd: BlockDiag) -> torch.Tensor:
    parts = list(bd.blocks.unbind(0)) + ([bd.tail] if bd.tail is not None else [])
    return torch.block_diag(*parts)


def _random_bd(n: int, block: int, seed: int = 0) -> BlockDiag:
    g = torch.Generator().manual_seed(seed)
    return stack_blocks(
        n, block, lambda c, s: torch.randn(c, s, s, generator=g, dtype=torch.float64)
    )


@pytest.mark.parametrize(
    ("n", "block", "expected"),
    [(32, 16, (2, 0)), (40, 16, (2, 8)), (7, 16, (1, 0)), (16, 16, (1, 0)), (17, 16, (1, 1))],
)
def test_split_sizes(n: int, block: int, expected: tuple[int, int]) -> None:
    assert split_sizes(n, block) == expected


@pytest.mark.parametrize(("n", "block"), [(40, 16), (32, 8), (7, 16), (17, 16), (30, 12)])
def test_stack_blocks_shapes_and_size(n: int, block: int) -> None:
    bd = _random_bd(n, block)
    b = min(block, n)
    assert bd.blocks.shape == (n // b, b, b)
    if n % b:
        assert bd.tail is not None and bd.tail.shape == (n % b, n % b)
    else:
        assert bd.tail is None
    assert bd.size == n


@pytest.mark.parametrize(("n", "block"), [(40, 16), (32, 8), (7, 16), (30, 12)])
def test_apply_blocks_matches_dense_block_diag(n: int, block: int) -> None:
    bd = _random_bd(n, block, seed=1)
    x = torch.randn(3, 5, n, dtype=torch.float64)
    y = apply_blocks(x, bd.blocks, bd.tail)
    assert y.shape == x.shape
    torch.testing.assert_close(y, x @ _dense(bd), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("n", "block"), [(40, 16), (24, 8), (5, 8)])
def test_apply_blocks_rows_left_multiplies(n: int, block: int) -> None:
    bd = _random_bd(n, block, seed=2)
    w = torch.randn(n, 9, dtype=torch.float64)
    torch.testing.assert_close(apply_blocks_rows(w, bd), _dense(bd) @ w, rtol=1e-12, atol=1e-12)


def test_inverse_transpose_preserves_product() -> None:
    """(x M)(W M^-T)^T = x W^T for a general invertible block-diagonal M."""
    n = 20
    g = torch.Generator().manual_seed(3)
    bd = stack_blocks(
        n,
        8,
        lambda c, s: (
            torch.randn(c, s, s, generator=g, dtype=torch.float64)
            + 3 * torch.eye(s, dtype=torch.float64)
        ),
    )
    x = torch.randn(4, n, dtype=torch.float64)
    w = torch.randn(6, n, dtype=torch.float64)
    inv_t = bd.inverse_transpose()
    xm = apply_blocks(x, bd.blocks, bd.tail)
    wm = apply_blocks(w, inv_t.blocks, inv_t.tail)
    torch.testing.assert_close(xm @ wm.mT, x @ w.mT, rtol=1e-9, atol=1e-9)


def test_transpose_and_to() -> None:
    bd = _random_bd(20, 8, seed=4)
    t = bd.transpose()
    torch.testing.assert_close(_dense(t), _dense(bd).mT)
    assert bd.to(torch.float32).blocks.dtype == torch.float32
    assert bd.to(torch.float32).tail.dtype == torch.float32


def test_orthogonality_error_detects_non_orthogonal() -> None:
    g = torch.Generator().manual_seed(5)
    q = random_orthogonal(2, 8, g)
    tail = random_orthogonal(1, 3, g)[0]
    assert orthogonality_error(BlockDiag(q, tail)) < 1e-12
    bad_tail = tail.clone()
    bad_tail[0, 0] += 0.01
    assert orthogonality_error(BlockDiag(q, bad_tail)) > 1e-3
    scaled = q * 1.001
    assert orthogonality_error(BlockDiag(scaled)) == pytest.approx(1.001**2 - 1, rel=1e-6)


def test_block_row_scales_factor_stacks_of_one_matrix_up_to_row_scales() -> None:
    gen = torch.Generator().manual_seed(0)
    r = torch.linalg.qr(torch.randn(8, 8, generator=gen))[0]
    d = torch.randint(0, 2, (5, 8), generator=gen).float() * 2 - 1
    d[0] = 1
    signs = block_row_scales(d.unsqueeze(-1) * r)
    assert signs is not None and torch.equal(signs, d)  # Hadamard-like: exact signs
    assert torch.equal(block_row_scales(r.expand(5, 8, 8)), torch.ones(5, 8))
    assert block_row_scales(r[None]) is None  # one block: nothing to share
    flipped = d[:, :, None] * r
    flipped[3] = flipped[3] @ r  # another matrix, not a row scaling
    assert block_row_scales(flipped) is None
    assert block_row_scales(torch.linalg.qr(torch.randn(5, 8, 8, generator=gen))[0]) is None
    # A calibrated in1: diag(1/s_k) R in float32, s over four orders of magnitude
    s = torch.rand(5, 8, generator=gen, dtype=torch.float64).mul(8).sub(4).exp2() ** 3
    smoothed = ((1 / s).unsqueeze(-1) * r.double()).float()
    scales = block_row_scales(smoothed)
    assert scales is not None
    torch.testing.assert_close(scales.double(), s[:1] / s, rtol=1e-6, atol=0)
    rebuilt = scales.unsqueeze(-1) * smoothed[0]
    torch.testing.assert_close(rebuilt, smoothed, rtol=1e-6, atol=0)
    off = smoothed.clone()
    off[2, 3] += 1e-3 * off[2, 3].norm()  # one row 1e-3 off the shared matrix
    assert block_row_scales(off) is None
