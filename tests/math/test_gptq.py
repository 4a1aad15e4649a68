"""Error-compensating rounding: valid codes on the given grid, lower output error than rounding."""

from __future__ import annotations

import pytest
import torch

from duquant_cli.math.gptq import gptq_quantize, inverse_factor
from duquant_cli.math.quantize import quantize_weight


def _case(seed: int = 0, out: int = 48, n: int = 64, rows: int = 512):
    g = torch.Generator().manual_seed(seed)
    # correlated inputs with a few strong channels, as LLM activations are
    x = torch.randn(rows, n, generator=g) @ torch.randn(n, n, generator=g) * 0.3
    x[:, 3] *= 8
    w = torch.randn(out, n, generator=g)
    return x, w


def _out_err(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    return float((x @ (wq - w).mT).norm() / (x @ w.mT).norm())


@pytest.mark.parametrize(
    ("bits", "asym", "group"), [(4, False, None), (3, True, None), (4, False, 16)]
)
def test_gptq_beats_rounding_on_the_calibration_rows(bits, asym, group) -> None:
    x, w = _case()
    rtn = quantize_weight(w, bits, asym=asym, group_size=group)
    q = gptq_quantize(w, x.mT @ x, rtn.scale, rtn.zero, bits)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == w.shape
    assert int(q.codes.max()) <= (1 << bits) - 1
    # same grid as rounding: scales and zeros are kept, only the codes move
    assert torch.equal(q.scale, rtn.scale)
    assert q.group_size == rtn.group_size
    if asym:
        assert torch.equal(q.zero, rtn.zero)
    assert _out_err(x, w, q.dequantize()) < 0.8 * _out_err(x, w, rtn.dequantize())


def test_gptq_with_identity_hessian_is_rounding() -> None:
    """With H = I no column can compensate another: the codes are nearest rounding."""
    _, w = _case(1)
    rtn = quantize_weight(w, 4, clip_search=False)
    q = gptq_quantize(w, torch.eye(w.shape[1]), rtn.scale, None, 4, damp=0.0)
    assert torch.equal(q.codes, rtn.codes)


def test_inverse_factor_handles_dead_and_singular_inputs() -> None:
    x, _ = _case(2, rows=16)  # 16 rows for 64 inputs: H is singular
    x[:, 5] = 0.0  # a dead input channel
    u = inverse_factor(x.mT @ x)
    assert u.shape == (64, 64)
    assert bool(torch.isfinite(u).all())
    assert torch.equal(u, torch.triu(u))
