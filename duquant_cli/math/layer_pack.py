"""One layer's pack: its transforms, its transformed and quantized weight.

The runtime computes, for input x [..., in]:
    x1 = x @ blockdiag(in1)            (optional; calibrated packs fold smoothing in here)
    x2 = x1[..., perm]                 (optional zigzag permutation)
    xt = x2 @ blockdiag(in2)           (optional block rotation)
    y' = Q_a(xt) @ W'^T                W' = the weight transformed the same way, quantized
    y  = y' @ blockdiag(out)           (row restore; `propagate` leaves y' and a rotated bias)
Every tensor named here is what the pack stores under that field name.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from duquant_cli.config import Precision, QuantConfig, Rotation, RowRot, Scheme
from duquant_cli.errors import TransformError
from duquant_cli.math.bitpack import pack_codes
from duquant_cli.math.blocks import (
    BlockDiag,
    apply_blocks,
    apply_blocks_rows,
    orthogonality_error,
    stack_blocks,
)
from duquant_cli.math.permutation import energy_scores, is_permutation, zigzag
from duquant_cli.math.quantize import QuantizedWeight, quantize_weight
from duquant_cli.math.rotations import gram_eigenbasis, signed_hadamard_blocks

ORTHO_TOL = 1e-5
BLOCK_FIELDS = ("in1", "in2", "out")


@dataclass
class LayerPack:
    """tensors: field -> tensor, as stored; info: small per-layer facts for the manifest."""

    tensors: dict[str, torch.Tensor]
    info: dict[str, float] = field(default_factory=dict)

    def block(self, name: str) -> BlockDiag | None:
        if name not in self.tensors:
            return None
        return BlockDiag(self.tensors[name], self.tensors.get(name + "_tail"))


def layer_generator(seed: int, name: str) -> torch.Generator:
    """A generator seeded by (seed, layer name): a layer's pack never depends on packing order."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def rotation_blocks(kind: Rotation, w_cols: torch.Tensor, block: int, gen) -> BlockDiag | None:
    """Data-free rotation for the columns of w_cols [rows, n] (float64 blocks)."""
    n = w_cols.shape[1]
    if kind is Rotation.HADAMARD:
        return stack_blocks(n, block, lambda c, s: signed_hadamard_blocks(c, s, gen))
    if kind is Rotation.SVD:
        rows = w_cols.shape[0]
        b = min(block, n)
        k = n // b

        def make(count: int, size: int) -> torch.Tensor:
            start = 0 if size == b and count == k else k * b
            cols = w_cols[:, start : start + count * size].reshape(rows, count, size)
            return gram_eigenbasis(cols.transpose(0, 1))

        return stack_blocks(n, block, make)
    return None


def _store(tensors: dict[str, torch.Tensor], name: str, bd: BlockDiag | None) -> BlockDiag | None:
    """Store a block transform in float32, checked orthogonal; return the stored (float32) one."""
    if bd is None:
        return None
    bd32 = bd.to(torch.float32)
    err = orthogonality_error(bd32)
    if not err < ORTHO_TOL:
        raise TransformError(f"{name} transform is not orthogonal (max |RR^T - I| = {err:.2e})")
    tensors[name] = bd32.blocks.contiguous()
    if bd32.tail is not None:
        tensors[name + "_tail"] = bd32.tail.contiguous()
    return bd32


def build_layer(
    name: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cfg: QuantConfig,
    precision: Precision,
) -> LayerPack:
    """Transforms and quantized weight for one linear layer, data-free (no activation stats)."""
    w = weight.float()
    in_f = w.shape[1]
    gen = layer_generator(cfg.seed, name)
    tensors: dict[str, torch.Tensor] = {}

    if cfg.permute:
        perm = zigzag(energy_scores(w, cfg.smooth_lambda), cfg.block)
        if not is_permutation(perm, in_f):
            raise TransformError(f"{name}: zigzag produced an invalid permutation")
        tensors["perm"] = perm
        w = w[:, perm]
    in2 = _store(tensors, "in2", rotation_blocks(cfg.rotation, w, cfg.block, gen))
    if in2 is not None:
        w = apply_blocks(w, in2.blocks, in2.tail)

    info: dict[str, float] = {}
    if cfg.row_rot is not RowRot.OFF:
        out = _store(tensors, "out", rotation_blocks(cfg.rotation, w.mT, cfg.row_block, gen))
        if out is not None:
            w = apply_blocks_rows(w, out)
            if cfg.row_rot is RowRot.PROPAGATE and bias is not None:
                tensors["bias"] = apply_blocks(bias.float(), out.blocks.mT, _mt(out.tail))
    return finish_weight(tensors, w, cfg, precision, info)


def _mt(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.mT


def finish_weight(
    tensors: dict[str, torch.Tensor],
    w: torch.Tensor,
    cfg: QuantConfig,
    precision: Precision,
    info: dict[str, float],
    qw: QuantizedWeight | None = None,
) -> LayerPack:
    """Quantize the transformed weight (or keep it in float32 at 16 bits) and record its error.

    `qw`: codes already chosen for `w` (error-compensated rounding), stored as given.
    """
    if precision.quantize_weight:
        if qw is None:
            qw = quantize_weight(
                w,
                precision.w_bits,
                asym=cfg.weight_scheme is Scheme.ASYM,
                group_size=cfg.group_size,
                clip_search=cfg.clip_search,
            )
        tensors["qweight"] = pack_codes(qw.codes, precision.w_bits)
        tensors["scale"] = qw.scale
        if qw.zero is not None:
            tensors["zero"] = qw.zero
        # In place: the dequantized weight is a temporary as large as the layer's float32 weight.
        err = qw.dequantize().sub_(w).norm() / w.norm().clamp_min(1e-30)
        info["weight_rel_error"] = float(err)
        # Scale spread, so `duquant inspect` can show it from the manifest without the tensors.
        info["scale_min"] = float(qw.scale.min())
        info["scale_median"] = float(qw.scale.median())
        info["scale_max"] = float(qw.scale.max())
    else:
        tensors["weight"] = w.contiguous()
        info["weight_rel_error"] = 0.0
    info["ortho_error"] = max(
        (orthogonality_error(b) for f in BLOCK_FIELDS if (b := LayerPack(tensors).block(f))),
        default=0.0,
    )
    for f in BLOCK_FIELDS:  # per transform, so inspect can leave a smoothed in1 out
        if (b := LayerPack(tensors).block(f)) is not None:
            info[f"ortho_error_{f}"] = orthogonality_error(b)
    return LayerPack(tensors, info)
