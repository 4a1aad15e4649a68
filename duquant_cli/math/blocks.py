"""Block-diagonal matrices stored as a stack of equal blocks plus an optional smaller tail.

A dimension n with block size B holds n // B full blocks; the n % B channels left over form one
tail block. Every transform in a pack uses this shape, so one function applies all of them with a
single batched matmul (and a second small one for the tail) instead of a loop over blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockDiag:
    """blocks: [n_blocks, B, B]; tail: [t, t] for the last n % B channels, or None."""

    blocks: torch.Tensor
    tail: torch.Tensor | None = None

    @property
    def size(self) -> int:
        n, b, _ = self.blocks.shape
        return n * b + (0 if self.tail is None else self.tail.shape[0])

    def to(self, dtype: torch.dtype) -> BlockDiag:
        tail = None if self.tail is None else self.tail.to(dtype)
        return BlockDiag(self.blocks.to(dtype), tail)

    def inverse_transpose(self) -> BlockDiag:
        """(M^-1)^T blockwise: what the weight side needs so that (x M)(W M^-T)^T = x W^T."""
        tail = None if self.tail is None else torch.linalg.inv(self.tail).mT
        return BlockDiag(torch.linalg.inv(self.blocks).mT, tail)

    def transpose(self) -> BlockDiag:
        tail = None if self.tail is None else self.tail.mT
        return BlockDiag(self.blocks.mT, tail)


def split_sizes(n: int, block: int) -> tuple[int, int]:
    """(number of full blocks, tail size) for a dimension of n with blocks of `block`."""
    b = min(block, n)
    return n // b, n % b


def apply_blocks(
    x: torch.Tensor, blocks: torch.Tensor, tail: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ blockdiag(blocks, tail) over the last dim, for any leading shape."""
    n_blocks, b, _ = blocks.shape
    head = n_blocks * b
    lead = x.shape[:-1]
    xb = x[..., :head].reshape(-1, n_blocks, b)
    y = torch.einsum("tnb,nbc->tnc", xb, blocks).reshape(*lead, head)
    if tail is None:
        return y
    return torch.cat([y, x[..., head:] @ tail], dim=-1)


def apply_blocks_rows(w: torch.Tensor, bd: BlockDiag) -> torch.Tensor:
    """blockdiag(R) @ w: each row block of w left-multiplied by its R (the output-side rotation),
    as one batched matmul over w's row blocks in place, into one new weight-sized tensor."""
    n_blocks, b, _ = bd.blocks.shape
    head = n_blocks * b
    out = w.new_empty(w.shape)
    torch.bmm(bd.blocks, w[:head].reshape(n_blocks, b, -1), out=out[:head].view(n_blocks, b, -1))
    if bd.tail is not None:
        torch.mm(bd.tail, w[head:], out=out[head:])
    return out


def stack_blocks(n: int, block: int, make) -> BlockDiag:
    """Build a BlockDiag for dimension n from `make(count, size) -> [count, size, size]`."""
    n_blocks, tail = split_sizes(n, block)
    b = min(block, n)
    return BlockDiag(make(n_blocks, b), make(1, tail)[0] if tail else None)


# Per row, the relative error up to which a block stack counts as one matrix up to row scales:
# far above float32 rounding (the scales are found in float64 from float32 blocks, 6e-8 of a
# row off for a calibrated pack's smoothed blocks), far below any other matrix.
ROW_SCALE_TOL = 1e-5


def block_row_scales(blocks: torch.Tensor) -> torch.Tensor | None:
    """Scales d [n_blocks, B] with every block R_k = diag(d_k) R_0 (each row within
    `ROW_SCALE_TOL` of its norm), for two blocks or more; else None. DuQuant's rotations are one
    matrix per layer (d = 1), the data-free Hadamard blocks one matrix with random row signs per
    block (d = +-1, exactly), a calibrated pack's first transform diag(1/s_k) R1 (d = s_0 / s_k):
    the runtime then applies a block transform as one elementwise product and one matmul over
    all blocks' rows."""
    if blocks.shape[0] < 2:
        return None
    b, first = blocks.double(), blocks[:1].double()
    d = (b * first).sum(-1) / (first * first).sum(-1)
    err = (d.unsqueeze(-1) * first - b).norm(dim=-1)
    return d.to(blocks.dtype) if (err <= ROW_SCALE_TOL * b.norm(dim=-1)).all() else None


def orthogonality_error(bd: BlockDiag) -> float:
    """max |R R^T - I| over all blocks (and the tail)."""
    mats = [bd.blocks] + ([bd.tail[None]] if bd.tail is not None else [])
    err = 0.0
    for m in mats:
        m = m.double()
        eye = torch.eye(m.shape[-1], dtype=m.dtype)
        err = max(err, float((m @ m.mT - eye).abs().amax()))
    return err
