"""Weight and activation quantizers.

Codes are unsigned in [0, 2^bits - 1] and dequantize as (code - zero) * scale. Symmetric
quantization uses the implied zero 2^(bits-1), so codes cover [-2^(b-1), 2^(b-1) - 1]; asymmetric
stores an integer zero per group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Clip ratios tried by the MSE search: 1.0 (no clip) down to 0.55.
CLIP_GRID = tuple(1.0 - 0.05 * i for i in range(10))
_CHUNK_ELEMS = 1 << 18  # rows per search chunk are chosen to keep a chunk about this many values


@dataclass(frozen=True)
class QuantizedWeight:
    """codes: uint8 [out, in]; scale: float32 [out, groups]; zero: uint8 [out, groups] or None."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_size: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero, self.bits, dtype)


def sym_zero(bits: int) -> int:
    return 1 << (bits - 1)


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(codes - zero) * scale in float32, then cast: the one definition every backend matches.

    Computed in place in one float32 copy of the codes (the same ops, so the same bits): a
    weight-sized temporary per step made dequantizing a large layer cost three weights' memory.
    """
    out, n = codes.shape
    groups = scale.shape[1]
    c = codes.to(torch.float32, copy=True).view(out, groups, n // groups)
    z = zero.float()[..., None] if zero is not None else float(sym_zero(bits))
    return c.sub_(z).mul_(scale.float()[..., None]).view(out, n).to(dtype)


def _ranges(wg: torch.Tensor, ratio: torch.Tensor, bits: int, asym: bool):
    """(scale, zero) per group for clip ratios `ratio` [rows, g]; zero is None when symmetric."""
    if asym:
        qmax = (1 << bits) - 1
        lo = (wg.amin(-1) * ratio).clamp(max=0.0)
        hi = (wg.amax(-1) * ratio).clamp(min=0.0)
        scale = ((hi - lo) / qmax).clamp_min(1e-12)
        return scale, torch.round(-lo / scale).clamp_(0, qmax)
    qmax = (1 << (bits - 1)) - 1
    return (wg.abs().amax(-1) * ratio / qmax).clamp_min(1e-12), None


def _codes(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int):
    """Unsigned codes [rows, g, gs] for the given per-group scale and zero."""
    z = zero[..., None] if zero is not None else float(sym_zero(bits))
    return (torch.round(wg / scale[..., None]) + z).clamp_(0, (1 << bits) - 1)


def _best_ratio(
    wg: torch.Tensor, bits: int, asym: bool, grid: tuple[float, ...] = CLIP_GRID
) -> torch.Tensor:
    """Per-group clip ratio from `grid` with the least squared reconstruction error (the first
    one on ties).

    Works in code units (w / scale) with preallocated buffers: this search is most of pack time.
    """
    best_err = best = None
    u = torch.empty_like(wg)
    r = torch.empty_like(wg)
    for ratio in grid:
        rt = torch.full(wg.shape[:2], ratio)
        scale, zero = _ranges(wg, rt, bits, asym)
        torch.div(wg, scale[..., None], out=u)
        if zero is not None:
            u.add_(zero[..., None])
        torch.round(u, out=r)
        if zero is not None:
            r.clamp_(0, (1 << bits) - 1)
        else:
            r.clamp_(-sym_zero(bits), sym_zero(bits) - 1)
        r.sub_(u)
        err = torch.linalg.vecdot(r, r) * scale.square()
        if best_err is None:
            best_err, best = err, rt
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, rt, best)
    return best


def quantize_weight(
    w: torch.Tensor,
    bits: int,
    *,
    asym: bool = False,
    group_size: int | None = None,
    clip_search: bool = True,
    grid: tuple[float, ...] = CLIP_GRID,
) -> QuantizedWeight:
    """Quantize per output channel (or per group of `group_size` inputs).

    With `clip_search`, each group's range is shrunk by the ratio in CLIP_GRID that minimises
    its squared reconstruction error: a few clipped outliers cost less than a coarse grid.
    `grid` replaces CLIP_GRID (ratios above 1 widen the range; imported legacy packs use theirs).
    """
    out, n = w.shape
    gs = group_size or n
    if n % gs:
        raise ValueError(f"group size {gs} does not divide in_features {n}")
    w = w.float().contiguous()
    rows = max(1, _CHUNK_ELEMS // n)
    codes = torch.empty(out, n, dtype=torch.uint8)
    scales = torch.empty(out, n // gs, dtype=torch.float32)
    zeros = torch.empty(out, n // gs, dtype=torch.uint8) if asym else None
    for r0 in range(0, out, rows):
        wg = w[r0 : r0 + rows].view(-1, n // gs, gs)
        ratio = _best_ratio(wg, bits, asym, grid) if clip_search else torch.ones(wg.shape[:2])
        scale, zero = _ranges(wg, ratio, bits, asym)
        codes[r0 : r0 + rows] = _codes(wg, scale, zero, bits).view(-1, n).to(torch.uint8)
        scales[r0 : r0 + rows] = scale
        if zeros is not None:
            zeros[r0 : r0 + rows] = zero.to(torch.uint8)
    return QuantizedWeight(codes, scales, zeros, bits, gs)


def fake_quant_per_token(x: torch.Tensor, bits: int, asym: bool = False, clip: float = 1.0):
    """Dynamic per-token quantize-dequantize of activations, in x's dtype; compile-friendly."""
    if asym:
        qmax = (1 << bits) - 1
        lo = x.amin(-1, keepdim=True).clamp(max=0) * clip
        hi = x.amax(-1, keepdim=True).clamp(min=0) * clip
        scale = ((hi - lo) / qmax).clamp_min(1e-8)
        zero = torch.round(-lo / scale)
        return (torch.round(x / scale + zero).clamp(0, qmax) - zero) * scale
    qmax = (1 << (bits - 1)) - 1
    scale = (x.abs().amax(-1, keepdim=True) * clip / qmax).clamp_min(1e-8)
    return torch.round(x / scale).clamp(-qmax - 1, qmax) * scale


def fake_quant_static(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Static per-channel symmetric quantize-dequantize with fixed calibrated scales."""
    qmax = (1 << (bits - 1)) - 1
    return torch.round(x / scale).clamp(-qmax - 1, qmax) * scale
