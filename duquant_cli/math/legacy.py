"""A layer of an earlier openpi-side DuQuant pack, expressed as our pack fields.

The legacy runtime computed x' = x[..., perm] @ blockdiag(Rin) and W' = blockdiag(Rout) ·
W[:, perm] · blockdiag(Rin), y = x' Q(W')^T, restored with y @ blockdiag(Rout), plus the bias:
exactly our `perm`, `in2` and `out` fields in `restore` mode. Its weight quantizer searched, per
output row, the scales max|row| / qmax / a for a in (0.5, 0.75, 1.0, 1.25, 1.5) (least squared
error; the first on ties), which is `quantize_weight` with the clip ratios 1 / a.
"""

from __future__ import annotations

import torch

from duquant_cli.config import Precision
from duquant_cli.math.bitpack import pack_codes
from duquant_cli.math.blocks import BlockDiag, apply_blocks, apply_blocks_rows, orthogonality_error
from duquant_cli.math.layer_pack import LayerPack
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
    info: dict[str, float] = {}
    if precision.quantize_weight:
        qw = quantize_weight(w, precision.w_bits, grid=LEGACY_GRID)
        tensors["qweight"] = pack_codes(qw.codes, precision.w_bits)
        tensors["scale"] = qw.scale
        info["weight_rel_error"] = float((qw.dequantize() - w).norm() / w.norm().clamp_min(1e-30))
        info["scale_min"] = float(qw.scale.min())
        info["scale_median"] = float(qw.scale.median())
        info["scale_max"] = float(qw.scale.max())
    else:
        tensors["weight"] = w.contiguous()
        info["weight_rel_error"] = 0.0
    errs = {
        f: orthogonality_error(BlockDiag(tensors[f], tensors.get(f + "_tail")))
        for f in ("in2", "out")
        if f in tensors
    }
    info["ortho_error"] = max(errs.values(), default=0.0)
    info |= {f"ortho_error_{f}": e for f, e in errs.items()}
    return LayerPack(tensors, info)
