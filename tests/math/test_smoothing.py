"""Smoothing scales: the SmoothQuant formula, clamped, with dead channels left alone."""

from __future__ import annotations

import torch

from duquant_cli.math.smoothing import S_MAX, S_MIN, smooth_scales


def test_formula() -> None:
    amax = torch.tensor([4.0, 1.0, 9.0])
    wmax = torch.tensor([1.0, 4.0, 0.25])
    s = smooth_scales(amax, wmax, 0.5)
    assert s.dtype == torch.float64
    torch.testing.assert_close(s, (amax / wmax).sqrt().double())
    torch.testing.assert_close(smooth_scales(amax, wmax, 1.0), amax.double())
    torch.testing.assert_close(smooth_scales(amax, wmax, 0.0), 1 / wmax.double())


def test_balances_the_two_sides_at_half() -> None:
    """At alpha 0.5, x/s and W*s end with the same per-channel maximum."""
    amax = torch.tensor([3000.0, 2.0, 0.5])
    wmax = torch.tensor([0.02, 0.3, 1.0])
    s = smooth_scales(amax, wmax, 0.5)
    torch.testing.assert_close(amax / s, wmax * s)


def test_dead_channels_get_one_and_extremes_are_clamped() -> None:
    amax = torch.tensor([0.0, 5.0, 1e12, 1e-9, float("nan")])
    wmax = torch.tensor([1.0, 0.0, 1e-9, 1e6, 1.0])
    s = smooth_scales(amax, wmax, 0.5)
    assert s[0] == 1.0 and s[1] == 1.0 and s[4] == 1.0
    assert s[2] == S_MAX and s[3] == S_MIN
    assert bool(torch.isfinite(s).all())
