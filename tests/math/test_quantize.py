"""Weight quantizer (codes, scales, zeros, clip search) and activation fake-quantizers."""

from __future__ import annotations

import pytest
import torch

from duquant_cli.math.quantize import (
    CLIP_GRID,
    dequantize,
    fake_quant_per_token,
    fake_quant_static,
    quantize_weight,
    sym_zero,
)


def _w(rows: int = 12, cols: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[0, 3] = 8.0  # an outlier the clip search should clip
    w[1] -= 0.7  # shifted row: asymmetric ranges differ from symmetric
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("group_size", [None, 8])
@pytest.mark.parametrize("clip_search", [False, True])
def test_codes_in_range_and_dequantize_definition(
    bits: int, asym: bool, group_size: int | None, clip_search: bool
) -> None:
    w = _w()
    q = quantize_weight(w, bits, asym=asym, group_size=group_size, clip_search=clip_search)
    groups = 32 // (group_size or 32)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == w.shape
    assert int(q.codes.max()) <= (1 << bits) - 1
    assert q.scale.dtype == torch.float32 and q.scale.shape == (12, groups)
    assert bool((q.scale > 0).all())
    assert q.group_size == (group_size or 32) and q.bits == bits
    if asym:
        assert q.zero is not None and q.zero.dtype == torch.uint8 and q.zero.shape == (12, groups)
        assert int(q.zero.max()) <= (1 << bits) - 1
        zero = q.zero.float().repeat_interleave(q.group_size, 1)
    else:
        assert q.zero is None
        zero = float(sym_zero(bits))
    expected = (q.codes.float() - zero) * q.scale.repeat_interleave(q.group_size, 1)
    torch.testing.assert_close(q.dequantize(), expected, rtol=0, atol=0)
    torch.testing.assert_close(dequantize(q.codes, q.scale, q.zero, bits), expected, rtol=0, atol=0)
    assert q.dequantize(torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_symmetric_zero_is_implied_midpoint(bits: int) -> None:
    assert sym_zero(bits) == 1 << (bits - 1)
    w = torch.zeros(2, 8)
    q = quantize_weight(w, bits)
    assert bool((q.codes == sym_zero(bits)).all())
    assert torch.equal(q.dequantize(), w)  # zero rows stay exactly zero, no NaN


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("group_size", [None, 8])
def test_no_clip_error_within_half_step(bits: int, asym: bool, group_size: int | None) -> None:
    w = _w(seed=1)
    q = quantize_weight(w, bits, asym=asym, group_size=group_size, clip_search=False)
    step = q.scale.repeat_interleave(q.group_size, 1)
    err = (q.dequantize() - w).abs()
    assert bool((err <= step / 2 + 1e-6).all())


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("group_size", [None, 8])
def test_clip_search_never_worse(bits: int, asym: bool, group_size: int | None) -> None:
    w = _w(rows=24, cols=64, seed=bits)
    base = quantize_weight(w, bits, asym=asym, group_size=group_size, clip_search=False)
    best = quantize_weight(w, bits, asym=asym, group_size=group_size, clip_search=True)
    gs = group_size or 64
    e_base = (base.dequantize() - w).view(24, -1, gs).pow(2).sum(-1)
    e_best = (best.dequantize() - w).view(24, -1, gs).pow(2).sum(-1)
    assert bool((e_best <= e_base * (1 + 1e-5) + 1e-12).all())  # per group, not just in total
    # the outlier makes clipping pay off at low bits: the search must find that
    if bits <= 3:
        assert float(e_best.sum()) < float(e_base.sum())


def test_clip_grid() -> None:
    assert CLIP_GRID[0] == 1.0 and len(CLIP_GRID) == 10
    assert CLIP_GRID[-1] == pytest.approx(0.55)


def test_chunking_matches_single_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Row chunks of the search (memory bound) must not change the result."""
    import duquant_cli.math.quantize as qmod

    w = _w(rows=40, cols=32, seed=3)
    whole = quantize_weight(w, 4, group_size=8)
    monkeypatch.setattr(qmod, "_CHUNK_ELEMS", 3 * 32)  # 3 rows per chunk, ragged last chunk
    chunked = quantize_weight(w, 4, group_size=8)
    assert torch.equal(whole.codes, chunked.codes)
    assert torch.equal(whole.scale, chunked.scale)


def test_group_size_must_divide() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        quantize_weight(torch.randn(4, 10), 4, group_size=4)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("asym", [False, True])
def test_fake_quant_per_token(bits: int, asym: bool) -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 64, generator=g)
    y = fake_quant_per_token(x, bits, asym=asym)
    assert y.shape == x.shape and y.dtype == x.dtype
    for row_x, row_y in zip(x.view(-1, 64), y.view(-1, 64), strict=True):
        assert row_y.unique().numel() <= 1 << bits
        if asym:
            step = float(row_x.max().clamp(min=0) - row_x.min().clamp(max=0)) / ((1 << bits) - 1)
        else:
            step = float(row_x.abs().max()) / ((1 << (bits - 1)) - 1)
        assert float((row_y - row_x).abs().max()) <= step / 2 + 1e-5
    # clipping shrinks the range
    clipped = fake_quant_per_token(x, bits, asym=asym, clip=0.5)
    assert float(clipped.abs().max()) < float(x.abs().max())


def test_fake_quant_static() -> None:
    x = torch.tensor([[0.26, -1.0, 3.0], [0.0, 0.49, -3.0]])
    scale = torch.tensor([0.25, 0.5, 0.01])
    y = fake_quant_static(x, scale, 8)
    expected = torch.tensor([[0.25, -1.0, 1.27], [0.0, 0.5, -1.28]])
    torch.testing.assert_close(y, expected)
