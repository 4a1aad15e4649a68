"""A layer of an earlier openpi-side DuQuant pack, expressed as our pack fields.

The legacy runtime computed x' = x[..., perm] @ blockdiag(Rin) and W' = blockdiag(Rout) ·
W[:, perm] · blockdiag(Rin), y = x' Q(W')^T, restored with y @ blockdiag(Rout), plus the bias:
exactly our `perm`, `in2` and `out` fields in `restore` mode. Its weight quantizer searched, per
output row, the scales max|row| / qmax / a for a in (0.5, 0.75, 1.0, 1.25, 1.5) (least squared
error; the first on ties), which is `quantize_weight` with the clip ratios 1 / a.
"""

from __future__ import annotations

import torch

from duquant_cli.config import Precision, QuantConfig
from duquant_cli.math.blocks import BlockDiag, apply_blocks, apply_blocks_rows
from duquant_cli.math.layer_pack import LayerPack, finish_weight
from duquant_cli.math.quantize import quantize_weight

LEGACY_DIVISORS = (0.5, 0.75, 1.0, 1.25, 1.5)
LEGACY_GRID = tuple(1.0 / a for a in LEGACY_DIVISORS)


def _put(tensors: dict[str, torch.Tensor], name: str, bd: BlockDiag) -> None:
    tensors[name] = bd.blocks.float().contiguous()
    if bd.tail is not None:
        tensors[name + "_tail"] = bd.tail.float().contiguous()


def legacy_layer(
    weight: torch.Tensor,
    perm: torch.Tensor | None,
    rin: BlockDiag | None,
    rout: BlockDiag | None,
    precision: Precision,
) -> LayerPack:
    """The pack tensors of one legacy layer: its transforms as stored, W' rebuilt from the
    source weight in float32 and quantized per row (symmetric) with the legacy scale grid,
    or kept in float32 at 16 bits. The transforms must already be checked orthogonal."""
    w = weight.float()
    tensors: dict[str, torch.Tensor] = {}
    if perm is not None:
        tensors["perm"] = perm.to(torch.int64).contiguous()
        w = w[:, tensors["perm"]]
    if rin is not None:
        _put(tensors, "in2", rin)
        w = apply_blocks(w, tensors["in2"], tensors.get("in2_tail"))
    if rout is not None:
        _put(tensors, "out", rout)
        w = apply_blocks_rows(w, BlockDiag(tensors["out"], tensors.get("out_tail")))
    qw = None
    if precision.quantize_weight:
        qw = quantize_weight(w, precision.w_bits, grid=LEGACY_GRID)
    # The config only matters for codes chosen inside finish_weight; these come chosen.
    return finish_weight(tensors, w, QuantConfig(), precision, {}, qw)
