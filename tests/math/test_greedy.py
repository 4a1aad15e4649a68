"""The greedy block rotation: orthogonal, never worse, and it tames planted outlier channels."""

from __future__ import annotations

import math

import pytest
import torch

from duquant_cli.math.greedy import (
    candidate_rows,
    greedy_rotation,
    step_bases,
    swaps,
    uniform_first_row,
)
from duquant_cli.math.rotations import random_orthogonal


def _outlier_rows(n: int, b: int, channels: tuple[int, ...], scale: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, b, generator=g, dtype=torch.float64)
    for c in channels:
        x[:, c] *= scale
    return x


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("b", [2, 12, 16, 64])
def test_uniform_first_row_is_orthonormal_with_flat_first_row(b: int) -> None:
    r0 = uniform_first_row(b)
    torch.testing.assert_close(r0 @ r0.mT, torch.eye(b, dtype=torch.float64))
    torch.testing.assert_close(r0[0], torch.full((b,), 1 / math.sqrt(b), dtype=torch.float64))


@pytest.mark.parametrize("b", [4, 16])
def test_each_step_spreads_the_chosen_channel_evenly(b: int) -> None:
    bases = step_bases(5, uniform_first_row(b), _gen())
    swap = swaps(b)
    for k in range(5):
        for d in (0, 1, b - 1):
            g = bases[k][swap[d]][:, swap[d]]
            torch.testing.assert_close(g @ g.mT, torch.eye(b, dtype=torch.float64))
            # a unit spike on channel d leaves with |1/sqrt(B)| on every channel
            torch.testing.assert_close(
                g[d].abs(), torch.full((b,), 1 / math.sqrt(b), dtype=torch.float64)
            )


@pytest.mark.parametrize(("b", "channels"), [(16, (3,)), (16, (0, 9)), (64, (5, 40, 41))])
def test_greedy_is_orthogonal_and_lowers_max_on_planted_outliers(b: int, channels) -> None:
    x = _outlier_rows(4096, b, channels, 40.0)
    rot = greedy_rotation(x, 256, _gen())
    r = rot.matrix
    assert r.dtype == torch.float64
    torch.testing.assert_close(r @ r.mT, torch.eye(b, dtype=torch.float64), atol=1e-12, rtol=0)
    before = float(x.abs().amax())
    after = float((x @ r).abs().amax())
    assert rot.max_before == pytest.approx(before)
    assert rot.max_after == pytest.approx(after)
    assert rot.steps >= 1
    # the outlier channel's energy is spread over the block: at least a 2x lower maximum
    assert after < before / 2


def test_greedy_never_makes_the_maximum_worse() -> None:
    x = torch.randn(2048, 16, generator=_gen(3), dtype=torch.float64)  # no outliers at all
    rot = greedy_rotation(x, 64, _gen())
    assert rot.max_after <= rot.max_before + 1e-12
    if rot.steps == 0:
        torch.testing.assert_close(rot.matrix, torch.eye(16, dtype=torch.float64))


def test_greedy_without_steps_or_data_is_identity() -> None:
    x = _outlier_rows(100, 8, (2,), 10.0)
    for rows, steps in ((x, 0), (torch.zeros(10, 8, dtype=torch.float64), 16), (x[:, :1], 8)):
        rot = greedy_rotation(rows, steps, _gen())
        assert rot.steps == 0
        torch.testing.assert_close(rot.matrix, torch.eye(rows.shape[1], dtype=torch.float64))


def test_greedy_is_reproducible_from_the_generator() -> None:
    x = _outlier_rows(1000, 16, (4,), 30.0)
    a = greedy_rotation(x, 32, _gen(7)).matrix
    b = greedy_rotation(x, 32, _gen(7)).matrix
    assert torch.equal(a, b)


def test_pruned_rows_cannot_hold_the_maximum_under_any_rotation() -> None:
    """The pruning bound: for every orthogonal R, max |x R| over all rows equals the maximum
    over the candidate rows (without a row cap the pruning is exact)."""
    x = _outlier_rows(3000, 16, (1,), 5.0, seed=1)
    x[::10] *= 0.1  # plenty of small rows to prune
    cand = candidate_rows(x)
    assert 0 < cand.shape[0] < x.shape[0]
    for r in random_orthogonal(20, 16, _gen(2)):
        assert float((x @ r).abs().amax()) == pytest.approx(float((cand @ r).abs().amax()))


def test_candidate_rows_cap_keeps_the_largest_norms() -> None:
    x = torch.randn(500, 8, generator=_gen(5), dtype=torch.float64)
    cand = candidate_rows(x, max_rows=10)
    norms = x.norm(dim=1)
    torch.testing.assert_close(cand.norm(dim=1).sort().values, norms.topk(10).values.sort().values)
