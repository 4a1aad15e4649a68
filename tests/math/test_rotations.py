"""Data-free rotations: Hadamard/DCT, signed blocks, Gram eigenbases, Haar-random."""

from __future__ import annotations

import math

import pytest
import torch

from duquant_cli.math.rotations import (
    gram_eigenbasis,
    hadamard,
    random_orthogonal,
    signed_hadamard_blocks,
)


def _ortho_err(m: torch.Tensor) -> float:
    eye = torch.eye(m.shape[-1], dtype=torch.float64)
    return float((m.double() @ m.double().mT - eye).abs().amax())


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 12, 16, 24, 31, 64])
def test_hadamard_is_orthonormal(n: int) -> None:
    h = hadamard(n)
    assert h.shape == (n, n) and h.dtype == torch.float64
    assert _ortho_err(h) < 1e-12


@pytest.mark.parametrize("n", [2, 4, 8, 16, 32])
def test_power_of_two_hadamard_spreads_evenly(n: int) -> None:
    h = hadamard(n)
    torch.testing.assert_close(h.abs(), torch.full((n, n), 1 / math.sqrt(n), dtype=torch.float64))


def test_signed_hadamard_blocks_are_seeded_and_orthogonal() -> None:
    a = signed_hadamard_blocks(3, 12, torch.Generator().manual_seed(7))
    b = signed_hadamard_blocks(3, 12, torch.Generator().manual_seed(7))
    c = signed_hadamard_blocks(3, 12, torch.Generator().manual_seed(8))
    assert a.shape == (3, 12, 12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert max(_ortho_err(m) for m in a) < 1e-12
    # rows are +-H rows: each block is diag(signs) @ H
    ratio = a[0] / hadamard(12)
    signs = ratio[:, 0]
    assert set(signs.round().tolist()) <= {-1.0, 1.0}
    torch.testing.assert_close(ratio, signs[:, None].expand(12, 12))


def test_gram_eigenbasis_descending_and_orthogonal() -> None:
    g = torch.Generator().manual_seed(9)
    cols = torch.randn(2, 50, 6, generator=g, dtype=torch.float64)
    cols[..., 0] *= 10  # one dominant direction
    v = gram_eigenbasis(cols)
    assert v.shape == (2, 6, 6)
    assert max(_ortho_err(m) for m in v) < 1e-10
    gram = cols.mT @ cols
    eig = torch.diagonal(v.mT @ gram @ v, dim1=-2, dim2=-1)
    assert torch.all(eig[:, :-1] >= eig[:, 1:] - 1e-9)


def test_random_orthogonal() -> None:
    q = random_orthogonal(4, 5, torch.Generator().manual_seed(0))
    assert q.shape == (4, 5, 5)
    assert max(_ortho_err(m) for m in q) < 1e-12
