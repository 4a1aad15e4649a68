"""The calibrated (activation-aware) layer pack: DuQuant's smoothing, rotation, zigzag, rotation.

With s the smoothing scales, R1 and R2 one B x B rotation each (shared by every block of the
layer) and P the zigzag permutation, the input transform is M = diag(1/s) . blockdiag(R1) . P .
blockdiag(R2). Smoothing is folded into the first block transform, so the pack keeps the runtime
of `layer_pack` unchanged:
    in1 block k = diag(1/s_k) @ R1      (not orthogonal once smoothing is folded in)
    perm        = P                     (zigzag over max |x| after smoothing and R1)
    in2 block k = R2
and the weight takes M^-T = diag(s) . blockdiag(R1) . P . blockdiag(R2), the same path with s
in place of 1/s. Everything is built in float64 on the calibration rows, checked, stored float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from duquant_cli.config import Precision, QuantConfig, Rotation, RowRot
from duquant_cli.errors import TransformError
from duquant_cli.math.blocks import (
    BlockDiag,
    apply_blocks,
    apply_blocks_rows,
    orthogonality_error,
    split_sizes,
)
from duquant_cli.math.greedy import greedy_rotation
from duquant_cli.math.layer_pack import (
    ORTHO_TOL,
    LayerPack,
    finish_weight,
    layer_generator,
    rotation_blocks,
)
from duquant_cli.math.permutation import is_permutation, zigzag
from duquant_cli.math.smoothing import smooth_scales


@dataclass(frozen=True)
class Rotated:
    """A block rotation and what it did to the calibration maximum (greedy steps kept)."""

    bd: BlockDiag
    steps: int


def block_rotation(
    kind: Rotation, x: torch.Tensor, w: torch.Tensor, block: int, steps: int, gen
) -> Rotated | None:
    """One rotation for the layer's blocks of x [rows, n] (w [out, n] for data-free kinds).

    Greedy: one matrix fitted on all full blocks' rows pooled together, shared by the blocks;
    the tail block (n % block channels) gets its own.
    """
    if kind is not Rotation.GREEDY:
        bd = rotation_blocks(kind, w, block, gen)
        return None if bd is None else Rotated(bd, 0)
    n = x.shape[1]
    k, t = split_sizes(n, block)
    b = min(block, n)
    head = greedy_rotation(x[:, : k * b].reshape(-1, b), steps, gen)
    tail = greedy_rotation(x[:, k * b :], steps, gen) if t else None
    blocks = head.matrix.expand(k, b, b).contiguous()
    return Rotated(
        BlockDiag(blocks, None if tail is None else tail.matrix),
        max(head.steps, tail.steps if tail else 0),
    )


def _apply(x: torch.Tensor, bd: BlockDiag | None) -> torch.Tensor:
    return x if bd is None else apply_blocks(x, bd.blocks, bd.tail)


def _check_rotation(name: str, field: str, bd: BlockDiag | None) -> float:
    if bd is None:
        return 0.0
    err = orthogonality_error(bd.to(torch.float32))
    if not err < ORTHO_TOL:
        raise TransformError(
            f"{name}: {field} rotation is not orthogonal (max |RR^T - I| = {err:.2e})"
        )
    return err


def fold_smoothing(s: torch.Tensor, r1: BlockDiag | None, block: int) -> BlockDiag:
    """blockdiag(diag(1/s_k) @ R1_k) for the x side (R1 None: the diagonal alone)."""
    n = s.shape[0]
    k, t = split_sizes(n, block)
    b = min(block, n)
    inv = 1.0 / s
    eye = torch.eye(b, dtype=torch.float64).expand(k, b, b)
    blocks = eye if r1 is None else r1.blocks
    blocks = blocks * inv[: k * b].view(k, b, 1)
    tail = None
    if t:
        rt = torch.eye(t, dtype=torch.float64) if r1 is None else r1.tail
        tail = rt * inv[k * b :, None]
    return BlockDiag(blocks.contiguous(), tail)


def build_calibrated_layer(
    name: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cfg: QuantConfig,
    precision: Precision,
    amax: torch.Tensor,
    rows: torch.Tensor,
    alpha: float | None = None,
) -> LayerPack:
    """Transforms and quantized weight for one layer from its calibration statistics.

    Args:
        amax: [in] max |x| per input channel over all calibration rows.
        rows: [r, in] a sample of calibration input rows.
        alpha: smoothing exponent (default `cfg.alpha`).
    """
    a = cfg.alpha if alpha is None else alpha
    w = weight.double()
    x = rows.double()
    in_f = w.shape[1]
    gen = layer_generator(cfg.seed, name)
    s = smooth_scales(torch.maximum(amax.double(), x.abs().amax(0)), w.abs().amax(0), a)
    if not bool(torch.isfinite(s).all()):
        raise TransformError(f"{name}: smoothing scales are not finite")
    x = x / s
    w = w * s
    info: dict[str, float] = {
        "alpha": a,
        "smooth_min": float(s.min()),
        "smooth_max": float(s.max()),
        "act_max": float(amax.max()),
        "act_max_smoothed": float(x.abs().amax()),
    }

    r1 = block_rotation(cfg.rotation, x, w, cfg.block, cfg.rot_steps, gen)
    r1_bd = None if r1 is None else r1.bd
    x, w = _apply(x, r1_bd), _apply(w, r1_bd)
    tensors: dict[str, torch.Tensor] = {}
    in1 = fold_smoothing(s, r1_bd, cfg.block).to(torch.float32)
    tensors["in1"] = in1.blocks
    if in1.tail is not None:
        tensors["in1_tail"] = in1.tail

    if cfg.permute:
        perm = zigzag(x.abs().amax(0), cfg.block)
        if not is_permutation(perm, in_f):
            raise TransformError(f"{name}: zigzag produced an invalid permutation")
        tensors["perm"] = perm
        x, w = x[:, perm], w[:, perm]
    r2 = block_rotation(cfg.rotation, x, w, cfg.block, cfg.rot_steps, gen)
    r2_bd = None if r2 is None else r2.bd
    x, w = _apply(x, r2_bd), _apply(w, r2_bd)
    if r2_bd is not None:
        r2_32 = r2_bd.to(torch.float32)
        tensors["in2"] = r2_32.blocks
        if r2_32.tail is not None:
            tensors["in2_tail"] = r2_32.tail
    info["act_max_rotated"] = float(x.abs().amax())
    info["rot1_steps"] = float(r1.steps if r1 else 0)
    info["rot2_steps"] = float(r2.steps if r2 else 0)

    out_bd = None
    if cfg.row_rot is not RowRot.OFF:
        out_bd = rotation_blocks(
            cfg.rotation if cfg.rotation is not Rotation.GREEDY else Rotation.HADAMARD,
            w.mT,
            cfg.row_block,
            gen,
        )
        if out_bd is not None:
            w = apply_blocks_rows(w, out_bd)
            o32 = out_bd.to(torch.float32)
            tensors["out"] = o32.blocks
            if o32.tail is not None:
                tensors["out_tail"] = o32.tail
            if cfg.row_rot is RowRot.PROPAGATE and bias is not None:
                tail = None if o32.tail is None else o32.tail.mT
                tensors["bias"] = apply_blocks(bias.float(), o32.blocks.mT, tail)

    errs = {
        "in1": _check_rotation(name, "in1", r1_bd),
        "in2": _check_rotation(name, "in2", r2_bd),
        "out": _check_rotation(name, "out", out_bd),
    }
    for key in ("in1", "in1_tail"):
        if key in tensors and not bool(torch.isfinite(tensors[key]).all()):
            raise TransformError(f"{name}: smoothed in1 transform is not finite")
    lp = finish_weight(tensors, w.float(), cfg, precision, info)
    # in1 holds diag(1/s) @ R1: report R1's orthogonality, checked before smoothing was folded in.
    lp.info["ortho_error"] = max(errs.values())
    for f, err in errs.items():
        if f"ortho_error_{f}" in lp.info:
            lp.info[f"ortho_error_{f}"] = err
    return lp
