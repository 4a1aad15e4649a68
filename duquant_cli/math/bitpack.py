"""Bit packing of unsigned weight codes: two codes per byte at <= 4 bits, one byte otherwise."""

from __future__ import annotations

import torch


def packed_cols(n: int, bits: int) -> int:
    return (n + 1) // 2 if bits <= 4 else n


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [out, n] -> uint8 [out, packed_cols(n)]; even columns in the low nibble."""
    if bits > 4:
        return codes.to(torch.uint8).contiguous()
    out, n = codes.shape
    c = codes.to(torch.uint8)
    if n % 2:
        c = torch.cat([c, torch.zeros(out, 1, dtype=torch.uint8)], 1)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_codes: uint8 [out, packed_cols(n)] -> uint8 [out, n]."""
    if bits > 4:
        return packed
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)[:, :n]
