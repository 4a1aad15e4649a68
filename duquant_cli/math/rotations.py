"""Data-free block rotations: signed Hadamard (DCT off powers of two) and weight-SVD bases.

All are built in float64; callers store them in float32 after checking orthogonality.
"""

from __future__ import annotations

import math

import torch


def hadamard(n: int) -> torch.Tensor:
    """Orthonormal n x n Walsh-Hadamard matrix; the orthonormal DCT-II where n is not a power of 2.

    Both spread one channel evenly over the block, which is what tames an outlier channel.
    """
    if n & (n - 1) == 0:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return h / math.sqrt(n)
    k = torch.arange(n, dtype=torch.float64)
    d = torch.cos(math.pi / n * (k[None, :] + 0.5) * k[:, None]) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.mT.contiguous()


def signed_hadamard_blocks(count: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """[count, size, size] of diag(random signs) @ H: each block its own signs, seeded."""
    signs = torch.randint(0, 2, (count, size), generator=gen).double() * 2 - 1
    return signs[:, :, None] * hadamard(size)[None]


def gram_eigenbasis(cols: torch.Tensor) -> torch.Tensor:
    """Eigenvectors (descending eigenvalue) of cols^T cols for a stack [count, rows, size].

    These are the left singular vectors of each block's transpose, got from a size x size
    Gram matrix, so a 16384-row block costs one small eigh, never a full SVD of a wide matrix.
    """
    cols = cols.double()
    gram = cols.mT @ cols
    _, vecs = torch.linalg.eigh(gram)
    return vecs.flip(-1).contiguous()


def random_orthogonal(count: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """[count, size, size] Haar-random orthogonal matrices (QR of Gaussians, sign-fixed)."""
    a = torch.randn(count, size, size, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
