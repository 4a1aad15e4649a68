"""Code packing: two codes per byte at <= 4 bits (low nibble = even column), a byte otherwise."""

from __future__ import annotations

import pytest
import torch

from duquant_cli.math.bitpack import pack_codes, packed_cols, unpack_codes


def _all_codes(bits: int, n: int) -> torch.Tensor:
    """Every code value 0..2^bits-1 in every column: row r, column c holds (r + c) mod 2^bits,
    followed by a few random rows."""
    levels = 1 << bits
    r = torch.arange(levels)[:, None]
    c = torch.arange(n)[None, :]
    rand = torch.randint(0, levels, (5, n), generator=torch.Generator().manual_seed(bits))
    return torch.cat([(r + c) % levels, rand], 0).to(torch.uint8)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n", [1, 2, 7, 8, 33])
def test_round_trip_exhaustive(bits: int, n: int) -> None:
    codes = _all_codes(bits, n)
    for col in range(n):  # every value occurs in every column
        assert set(codes[:, col].tolist()) == set(range(1 << bits))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (codes.shape[0], packed_cols(n, bits))
    assert torch.equal(unpack_codes(packed, bits, n), codes)


@pytest.mark.parametrize(
    ("n", "bits", "cols"), [(7, 4, 4), (8, 4, 4), (8, 2, 4), (7, 5, 7), (8, 8, 8)]
)
def test_packed_cols(n: int, bits: int, cols: int) -> None:
    assert packed_cols(n, bits) == cols


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nibble_layout_low_is_even_column(bits: int) -> None:
    codes = torch.tensor([[1, 2, 3], [3, 0, 1]], dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.tolist() == [[1 | (2 << 4), 3], [3 | (0 << 4), 1]]  # odd tail: high nibble 0


def test_wide_codes_are_stored_one_per_byte() -> None:
    codes = torch.tensor([[0, 255, 17]], dtype=torch.uint8)
    assert torch.equal(pack_codes(codes, 8), codes)
    assert torch.equal(pack_codes(codes.long(), 8), codes)  # converted to uint8
