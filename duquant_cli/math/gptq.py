"""Error-compensating weight rounding (GPTQ, Frantar et al. 2022) against calibration inputs.

Rounding each weight to its nearest code ignores what the layer computes. GPTQ quantizes the
input columns one at a time and spreads each column's rounding error over the columns not yet
quantized, weighted by H = X^T X of the calibration inputs, so that X W_q^T stays close to
X W^T. Every output row is independent given H, so each step is vectorized over all rows; the
loop runs over the columns of one block (a sequential algorithm, like the greedy steps), and
the rest of the weight is updated once per block with one matmul.

The scales (and zeros) are chosen first and kept fixed, so the codes dequantize exactly like
those of `quantize_weight`.
"""

from __future__ import annotations

import torch

from duquant_cli.math.quantize import QuantizedWeight, sym_zero

DAMP = 0.01  # H += DAMP * mean(diag H) * I: H from a few thousand rows is often singular
BLOCK = 128


def gram(x: torch.Tensor) -> torch.Tensor:
    """H = X^T X [n, n] (float32) of calibration rows x [r, n]."""
    x = x.float()
    return x.mT @ x


def inverse_factor(h: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damping)^-1 (float32), the GPTQ update weights.

    Columns no calibration row touched (zero diagonal) get a unit diagonal, so they are simply
    rounded; damping grows tenfold (up to twice) if round-off leaves H indefinite.
    """
    h = h.float().clone()
    diag = torch.diagonal(h)
    diag[diag <= 0] = 1.0
    step = damp * float(diag.mean())
    for _ in range(3):
        diag.add_(step)
        lower, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        step *= 10.0
    return torch.diag(diag.rsqrt())


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    *,
    damp: float = DAMP,
    block: int = BLOCK,
) -> QuantizedWeight:
    """Codes for w [out, n] with the given per-group scale [out, groups] (and zero, asymmetric),
    rounded column by column with error feedback through H [n, n] = X^T X.

    The weight is held transposed, one contiguous row per input column: each column is rounded
    on its fixed grid, and its error (weight units, scaled by U) is taken off the columns after
    it: within the block one at a time, beyond it once per block.
    """
    out, n = w.shape
    groups = scale.shape[1]
    gs = n // groups
    qmax = float((1 << bits) - 1)
    u = inverse_factor(h, damp)
    s_t = scale.float().repeat_interleave(gs, dim=1).mT.contiguous()  # [n, out]
    z_t = (
        zero.float().repeat_interleave(gs, dim=1).mT.contiguous()
        if zero is not None
        else torch.full((n, 1), float(sym_zero(bits)))
    )
    work = w.float().mT.contiguous()  # [n, out]: row j is input column j
    codes = torch.empty(n, out)
    dq = torch.empty(out)
    err = torch.empty(min(block, n), out)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        wb, u1, e1 = work[i1:i2], u[i1:i2, i1:i2], err[: i2 - i1]
        for i in range(i2 - i1):
            j = i1 + i
            s, z = s_t[j], z_t[j]
            q = codes[j]
            torch.div(wb[i], s, out=q).add_(z).round_().clamp_(0.0, qmax)
            torch.sub(q, z, out=dq).mul_(s)
            torch.sub(wb[i], dq, out=e1[i]).div_(u1[i, i])
            wb[i + 1 :].addr_(u1[i, i + 1 :], e1[i], alpha=-1.0)
        if i2 < n:
            work[i2:].addmm_(u[i1:i2, i2:].mT, e1, alpha=-1.0)
    return QuantizedWeight(
        codes.mT.to(torch.uint8).contiguous(),
        scale.float(),
        None if zero is None else zero,
        bits,
        gs,
    )
