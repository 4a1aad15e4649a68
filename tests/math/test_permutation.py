"""Zigzag permutation, energy scores and the permutation check."""

from __future__ import annotations

import pytest
import torch

from duquant_cli.math.permutation import energy_scores, is_permutation, zigzag


@pytest.mark.parametrize(("n", "block"), [(64, 16), (40, 16), (7, 16), (16, 16), (30, 4), (1, 1)])
def test_zigzag_is_a_permutation(n: int, block: int) -> None:
    scores = torch.randn(n, generator=torch.Generator().manual_seed(n))
    perm = zigzag(scores, block)
    assert perm.dtype == torch.int64
    assert is_permutation(perm, n)
    assert sorted(perm.tolist()) == list(range(n))


@pytest.mark.parametrize(("k", "b"), [(4, 16), (3, 8), (5, 2), (2, 7)])
def test_zigzag_top_k_channels_land_in_different_blocks(k: int, b: int) -> None:
    n = k * b
    scores = torch.rand(n, generator=torch.Generator().manual_seed(k * 100 + b))
    perm = zigzag(scores, b)
    # position p of the permuted input holds channel perm[p]; its block is p // b
    block_of = torch.empty(n, dtype=torch.long)
    block_of[perm] = torch.arange(n) // b
    top = torch.argsort(scores, descending=True)[:k]
    assert sorted(block_of[top].tolist()) == list(range(k))
    # every block gets exactly one channel from each group of k consecutive ranks
    ranks = torch.empty(n, dtype=torch.long)
    ranks[torch.argsort(scores, descending=True)] = torch.arange(n)
    for r in range(b):
        group = torch.nonzero((ranks // k) == r).flatten()
        assert sorted(block_of[group].tolist()) == list(range(k))


@pytest.mark.parametrize(("k", "b"), [(4, 16), (3, 8), (5, 2)])
def test_zigzag_equal_rank_sums_for_even_block(k: int, b: int) -> None:
    """Zigzag (0..K-1, K-1..0, ...) with an even number of rounds gives equal rank sums."""
    n = k * b
    scores = torch.randn(n, generator=torch.Generator().manual_seed(1))
    perm = zigzag(scores, b)
    ranks = torch.empty(n, dtype=torch.long)
    ranks[torch.argsort(scores.double(), descending=True)] = torch.arange(n)
    sums = ranks[perm].view(k, b).sum(1)
    assert torch.all(sums == sums[0]), sums


def test_zigzag_tail_gets_smallest_scores() -> None:
    n, b = 40, 16  # 2 full blocks, tail of 8
    scores = torch.randn(n, generator=torch.Generator().manual_seed(2))
    perm = zigzag(scores, b)
    smallest = set(torch.argsort(scores)[:8].tolist())
    assert set(perm[32:].tolist()) == smallest


def test_zigzag_block_larger_than_dim_keeps_sorted_order() -> None:
    scores = torch.tensor([0.1, 5.0, 2.0, 3.0])
    perm = zigzag(scores, 16)
    assert perm.tolist() == [1, 3, 2, 0]


def test_energy_scores() -> None:
    w = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    e = torch.tensor([5.0, 2.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(energy_scores(w, 0.0), e)
    torch.testing.assert_close(
        energy_scores(w, 1.0), torch.full((3,), e.mean().item(), dtype=torch.float64)
    )
    torch.testing.assert_close(energy_scores(w, 0.5), 0.5 * e + 0.5 * e.mean())
    # lambda < 1 keeps the order of the columns
    assert torch.argsort(energy_scores(w, 0.15), descending=True).tolist() == [0, 1, 2]


def test_is_permutation_positive() -> None:
    assert is_permutation(torch.tensor([2, 0, 1]), 3)
    assert is_permutation(torch.tensor([2, 0, 1], dtype=torch.int32), 3)
    assert is_permutation(torch.arange(0), 0)


@pytest.mark.parametrize(
    ("perm", "n"),
    [
        (torch.tensor([0, 1, 1]), 3),  # repeated index
        (torch.tensor([0, 1, 3]), 3),  # out of range (too large)
        (torch.tensor([0, -1, 2]), 3),  # out of range (negative)
        (torch.tensor([0, 1]), 3),  # wrong length (short)
        (torch.tensor([0, 1, 2, 3]), 3),  # wrong length (long)
        (torch.tensor([[0, 1, 2]]), 3),  # not 1-D
        (torch.tensor([0.0, 1.0, 2.0]), 3),  # not integer
    ],
)
def test_is_permutation_negative(perm: torch.Tensor, n: int) -> None:
    assert not is_permutation(perm, n)
