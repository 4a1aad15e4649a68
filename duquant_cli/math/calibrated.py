"""The calibrated (activation-aware) pack of an input group: DuQuant's smoothing, rotation,
zigzag, rotation, then error-compensated weight rounding.

With s the smoothing scales, R1 and R2 one B x B rotation each (shared by every block) and P the
zigzag permutation, the input transform is M = diag(1/s) . blockdiag(R1) . P . blockdiag(R2).
Smoothing is folded into the first block transform, so the pack keeps the runtime of
`layer_pack` unchanged:
    in1 block k = diag(1/s_k) @ R1      (not orthogonal once smoothing is folded in)
    perm        = P                     (zigzag over max |x| after smoothing and R1)
    in2 block k = R2
and the weight takes M^-T = diag(s) . blockdiag(R1) . P . blockdiag(R2), the same path with s
in place of 1/s. The transforms and the weight are built in float64 (statistics of the
calibration rows in float32), checked, and stored in float32.

Layers fed the same input (q/k/v, gate/up) form an input group: one transform, fitted with
wmax over all their weights (as SmoothQuant folds one smoothing into the shared norm), and one
H = X^T X for their error-compensated rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from duquant_cli.config import Precision, QuantConfig, Rotation, RowRot, Scheme
from duquant_cli.errors import TransformError
from duquant_cli.math.blocks import (
    BlockDiag,
    apply_blocks,
    apply_blocks_rows,
    orthogonality_error,
    split_sizes,
)
from duquant_cli.math.gptq import gptq_quantize, gram
from duquant_cli.math.greedy import greedy_rotation
from duquant_cli.math.layer_pack import (
    ORTHO_TOL,
    LayerPack,
    finish_weight,
    layer_generator,
    rotation_blocks,
)
from duquant_cli.math.permutation import is_permutation, zigzag
from duquant_cli.math.quantize import QuantizedWeight, fake_quant_per_token, quantize_weight
from duquant_cli.math.smoothing import smooth_scales

ERROR_ROWS = 256  # calibration rows the recorded output error is measured on


def block_rotation(
    kind: Rotation, x: torch.Tensor, w: torch.Tensor, block: int, steps: int, gen
) -> tuple[BlockDiag | None, int]:
    """(rotation of the layer's blocks, greedy steps kept) for x [rows, n] (w [out, n] for the
    data-free kinds). Greedy: one matrix fitted on all full blocks' rows pooled together and
    shared by the blocks; the tail block (n % block channels) gets its own."""
    if kind is not Rotation.GREEDY:
        return rotation_blocks(kind, w, block, gen), 0
    n = x.shape[1]
    k, t = split_sizes(n, block)
    b = min(block, n)
    head = greedy_rotation(x[:, : k * b].reshape(-1, b), steps, gen)
    tail = greedy_rotation(x[:, k * b :], steps, gen) if t else None
    # An expanded view (stride 0 over blocks) marks the matrix as shared: see `_apply`.
    bd = BlockDiag(head.matrix.expand(k, b, b), None if tail is None else tail.matrix)
    return bd, max(head.steps, tail.steps if tail else 0)


def _apply(x: torch.Tensor, bd: BlockDiag | None) -> torch.Tensor:
    """x @ blockdiag(bd), in x's dtype; one matmul when every block is the same matrix."""
    if bd is None:
        return x
    k, b, _ = bd.blocks.shape
    if k > 1 and bd.blocks.stride(0) == 0:
        head = (x[:, : k * b].reshape(-1, b) @ bd.blocks[0].to(x.dtype)).reshape(-1, k * b)
        if bd.tail is None:
            return head
        return torch.cat([head, x[:, k * b :] @ bd.tail.to(x.dtype)], dim=1)
    bd = bd.to(x.dtype)
    return apply_blocks(x, bd.blocks, bd.tail)


def fold_smoothing(s: torch.Tensor, r1: BlockDiag | None, block: int) -> BlockDiag:
    """blockdiag(diag(1/s_k) @ R1_k) for the x side (R1 None: the diagonal alone)."""
    n = s.shape[0]
    k, t = split_sizes(n, block)
    b = min(block, n)
    inv = 1.0 / s
    blocks = torch.eye(b, dtype=torch.float64).expand(k, b, b) if r1 is None else r1.blocks
    blocks = blocks * inv[: k * b].view(k, b, 1)
    tail = None
    if t:
        rt = torch.eye(t, dtype=torch.float64) if r1 is None else r1.tail
        tail = rt * inv[k * b :, None]
    return BlockDiag(blocks.contiguous(), tail)


@dataclass(frozen=True)
class InputTransform:
    """M = diag(1/s) . blockdiag(r1) . P . blockdiag(r2) (float64), and what it did."""

    s: torch.Tensor
    r1: BlockDiag | None
    perm: torch.Tensor | None
    r2: BlockDiag | None
    block: int
    info: dict[str, float] = field(default_factory=dict)

    def _path(self, t: torch.Tensor) -> torch.Tensor:
        t = _apply(t.contiguous(), self.r1)
        if self.perm is not None:
            t = t[:, self.perm]
        return _apply(t, self.r2)

    def apply_x(self, x: torch.Tensor) -> torch.Tensor:
        """x M for rows x [r, n], in float32: calibration statistics need no more."""
        return self._path(x.float() / self.s.float())

    def apply_w(self, w: torch.Tensor) -> torch.Tensor:
        """W M^-T for w [out, n], so that (x M)(W M^-T)^T = x W^T."""
        return self._path(w.double() * self.s)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The pack fields in1 (smoothing folded in), perm, in2, in float32."""
        out: dict[str, torch.Tensor] = {}
        in1 = fold_smoothing(self.s, self.r1, self.block).to(torch.float32)
        out["in1"] = in1.blocks
        if in1.tail is not None:
            out["in1_tail"] = in1.tail
        if self.perm is not None:
            out["perm"] = self.perm
        if self.r2 is not None:
            r2 = self.r2.to(torch.float32)
            out["in2"] = r2.blocks.contiguous()
            if r2.tail is not None:
                out["in2_tail"] = r2.tail
        return out


def _check_rotation(name: str, field_name: str, bd: BlockDiag | None) -> float:
    if bd is None:
        return 0.0
    err = orthogonality_error(bd.to(torch.float32))
    if not err < ORTHO_TOL:
        raise TransformError(
            f"{name}: {field_name} rotation is not orthogonal (max |RR^T - I| = {err:.2e})"
        )
    return err


def fit_input_transform(
    name: str,
    rows: torch.Tensor,
    amax: torch.Tensor,
    weight: torch.Tensor,
    cfg: QuantConfig,
    alpha: float,
) -> InputTransform:
    """Smoothing, greedy rotation, zigzag and second rotation fitted on calibration rows [r, n].

    `weight` [out, n]: every weight fed this input, stacked (the smoothing balances against
    their column max; data-free rotation kinds are built from them). Seeded by (seed, name).
    """
    n = rows.shape[1]
    gen = layer_generator(cfg.seed, name)
    amax = torch.maximum(amax.double(), rows.abs().amax(0).double())
    s = smooth_scales(amax, weight.abs().amax(0), alpha)
    if not bool(torch.isfinite(s).all()):
        raise TransformError(f"{name}: smoothing scales are not finite")
    x = rows.float() / s.float()
    w_cols = weight.double() * s if cfg.rotation is Rotation.SVD else weight[:1].double()
    info = {
        "alpha": alpha,
        "smooth_min": float(s.min()),
        "smooth_max": float(s.max()),
        "act_max": float(amax.max()),
        "act_max_smoothed": float(x.abs().amax()),
    }
    r1, steps1 = block_rotation(cfg.rotation, x, w_cols, cfg.block, cfg.rot_steps, gen)
    x = _apply(x, r1)
    perm = None
    if cfg.permute:
        perm = zigzag(x.abs().amax(0), cfg.block)
        if not is_permutation(perm, n):
            raise TransformError(f"{name}: zigzag produced an invalid permutation")
        x = x[:, perm]
    if cfg.rotation is Rotation.SVD:
        w_cols = _apply(w_cols, r1)
        w_cols = w_cols if perm is None else w_cols[:, perm]
    r2, steps2 = block_rotation(cfg.rotation, x, w_cols, cfg.block, cfg.rot_steps, gen)
    x = _apply(x, r2)
    info |= {
        "act_max_rotated": float(x.abs().amax()),
        "rot1_steps": float(steps1),
        "rot2_steps": float(steps2),
        "ortho_error_in1": _check_rotation(name, "in1", r1),
        "ortho_error_in2": _check_rotation(name, "in2", r2),
    }
    return InputTransform(s, r1, perm, r2, cfg.block, info)


def _quantize_group(
    ws: list[torch.Tensor], h: torch.Tensor | None, cfg: QuantConfig, bits: int
) -> list[QuantizedWeight]:
    """Quantize weights sharing one input together: scales per output channel (weight-MSE clip
    search), then error-compensated rounding through H, all rows in one pass."""
    w = torch.cat(ws).float()
    qw = quantize_weight(
        w,
        bits,
        asym=cfg.weight_scheme is Scheme.ASYM,
        group_size=cfg.group_size,
        clip_search=cfg.clip_search,
    )
    if h is not None:
        qw = gptq_quantize(w, h, qw.scale, qw.zero, bits)
    parts, start = [], 0
    for part in ws:
        end = start + part.shape[0]
        zero = None if qw.zero is None else qw.zero[start:end]
        parts.append(
            QuantizedWeight(qw.codes[start:end], qw.scale[start:end], zero, bits, qw.group_size)
        )
        start = end
    return parts


def build_calibrated_layers(
    names: list[str],
    weights: list[torch.Tensor],
    biases: list[torch.Tensor | None],
    cfg: QuantConfig,
    precisions: list[Precision],
    amax: torch.Tensor,
    rows: torch.Tensor,
    alpha: float | None = None,
) -> list[LayerPack]:
    """Packs of the layers of one input group (one layer is a group of one).

    Args:
        names / weights / biases / precisions: the group's layers, in pack order; the first
            name seeds the transform.
        amax: [in] max |x| per input channel over all calibration rows.
        rows: [r, in] a sample of the calibration input rows.
        alpha: smoothing exponent (default `cfg.alpha`).
    """
    a = cfg.alpha if alpha is None else alpha
    t = fit_input_transform(names[0], rows, amax, torch.cat(weights).detach(), cfg, a)
    x3 = t.apply_x(rows)
    h = gram(x3) if cfg.gptq else None
    x_err = rows[:ERROR_ROWS].float()
    x3_err = x3[:ERROR_ROWS]

    w3s = [t.apply_w(w).float() for w in weights]
    outs: list[BlockDiag | None] = []
    for i, w3 in enumerate(w3s):
        out_bd = None
        if cfg.row_rot is not RowRot.OFF:
            kind = Rotation.HADAMARD if cfg.rotation is Rotation.GREEDY else cfg.rotation
            gen = layer_generator(cfg.seed, names[i])
            out_bd = rotation_blocks(kind, w3.mT.double(), cfg.row_block, gen)
            if out_bd is not None:
                out_bd = out_bd.to(torch.float32)
                w3s[i] = apply_blocks_rows(w3, out_bd)
        outs.append(out_bd)

    qws: list[QuantizedWeight | None] = [None] * len(names)
    for bits in sorted({p.w_bits for p in precisions if p.quantize_weight}):
        idx = [i for i, p in enumerate(precisions) if p.w_bits == bits]
        for i, qw in zip(idx, _quantize_group([w3s[i] for i in idx], h, cfg, bits), strict=True):
            qws[i] = qw

    base = t.tensors()
    packs = []
    for i, name in enumerate(names):
        tensors = {k: v.clone() for k, v in base.items()}  # each layer owns its tensors
        out_bd = outs[i]
        if out_bd is not None:
            tensors["out"] = out_bd.blocks
            if out_bd.tail is not None:
                tensors["out_tail"] = out_bd.tail
            if cfg.row_rot is RowRot.PROPAGATE and biases[i] is not None:
                tail = None if out_bd.tail is None else out_bd.tail.mT
                tensors["bias"] = apply_blocks(biases[i].float(), out_bd.blocks.mT, tail)
        info = dict(t.info) | {"ortho_error_out": _check_rotation(name, "out", out_bd)}
        lp = finish_weight(tensors, w3s[i], cfg, precisions[i], info, qws[i])
        # in1 holds diag(1/s) @ R1: its orthogonality is R1's, checked before folding.
        lp.info["ortho_error_in1"] = t.info["ortho_error_in1"]
        lp.info["ortho_error"] = max(lp.info[f"ortho_error_{f}"] for f in ("in1", "in2", "out"))
        wq = w3s[i] if qws[i] is None else qws[i].dequantize()
        lp.info["output_rel_error"] = _output_error(
            x_err, x3_err, weights[i], wq, precisions[i], cfg, out_bd
        )
        packs.append(lp)
    return packs


def _output_error(
    x: torch.Tensor,
    x3: torch.Tensor,
    weight: torch.Tensor,
    wq: torch.Tensor,
    precision: Precision,
    cfg: QuantConfig,
    out_bd: BlockDiag | None,
) -> float:
    """||Q_a(x M) W_q^T - x W^T|| / ||x W^T|| on calibration rows, as the runtime computes it
    (W_q: the stored weight, dequantized)."""
    xq = x3
    if precision.quantize_act:
        xq = fake_quant_per_token(x3, precision.a_bits, cfg.act_scheme is Scheme.ASYM, cfg.act_clip)
    y = xq @ wq.mT
    if out_bd is not None:
        y = apply_blocks(y, out_bd.blocks, out_bd.tail)
    ref = x @ weight.float().mT
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))
