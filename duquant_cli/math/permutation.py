"""The zigzag permutation that deals large channels fairly across blocks."""

from __future__ import annotations

import torch


def zigzag(scores: torch.Tensor, block: int) -> torch.Tensor:
    """Permutation `perm` with x[..., perm] dealing channels sorted by score into blocks 0..K-1,
    K-1..0, 0..K-1, ... so every full block gets the same share of large channels.

    Channels past the last full block (the tail) receive the smallest scores.
    """
    n = scores.numel()
    b = min(block, n)
    k = n // b
    order = torch.argsort(scores.double(), descending=True, stable=True)
    head = k * b
    rank = torch.arange(head)
    rnd, pos = rank // k, rank % k
    blk = torch.where(rnd % 2 == 0, pos, k - 1 - pos)
    perm = torch.empty(n, dtype=torch.int64)
    perm[blk * b + rnd] = order[:head]
    perm[head:] = order[head:]
    return perm


def energy_scores(weight: torch.Tensor, smooth_lambda: float) -> torch.Tensor:
    """Column energy mean(W^2) pulled toward its mean by lambda (the earlier data-free score).

    Squared in place in one float64 copy: a second float64 temporary was a pack's largest
    allocation (256 MiB for a 16384x2048 weight). `copy=True`: never square the caller's tensor.
    """
    e = weight.to(torch.float64, copy=True).pow_(2).mean(0)
    return (1.0 - smooth_lambda) * e + smooth_lambda * e.mean()


def is_permutation(perm: torch.Tensor, n: int) -> bool:
    if perm.dim() != 1 or perm.numel() != n or perm.dtype not in (torch.int32, torch.int64):
        return False
    seen = torch.zeros(n, dtype=torch.bool)
    if n and (perm.min() < 0 or perm.max() >= n):
        return False
    seen[perm.long()] = True
    return bool(seen.all())
