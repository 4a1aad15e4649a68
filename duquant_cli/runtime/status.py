"""`status(model)`: what each DuQuant layer of a live model runs with."""

from __future__ import annotations

from typing import Any

from torch import nn

from duquant_cli.runtime.layer import ACT_STATIC, DuQuantLinear
from duquant_cli.runtime.loader import module_bytes

PROPAGATE_NOTE = "output left rotated (y R^T): exact only if its consumer absorbs R"


def act_status(layer: DuQuantLinear) -> str:
    """'dynamic', 'none', 'static (calibrated, p99.9)', or 'calibrating' inside `calibrating`."""
    if layer.observer is not None:
        return "calibrating"
    if layer.act_mode == ACT_STATIC:
        if not layer.calibrated or layer.act_scale is None:
            return "static (uncalibrated)"
        p = layer.act_percentile
        return "static (calibrated" + (f", p{p:g})" if p is not None else ")")
    return layer.act_mode


def status(model: nn.Module) -> list[dict[str, Any]]:
    """One row per DuQuant layer: backend (and why), device, dtype, precision, whether the
    weight is pre-quantized and cached, activation mode, row rotation, bytes held.

    This is how a user checks the fast path is on: every row should say `cached: True`, and on
    CPU `prep: fused` (the activation path in C, `runtime.prep`; "torch ops" where there is no
    C compiler or the layer has static or asymmetric activations); a `note` flags layers whose
    output stays rotated (propagate mode).

    Example:
        >>> for row in status(model):  # doctest: +SKIP
        ...     print(row["name"], row["backend"], row["activations"])
    """
    rows = []
    for name, m in model.named_modules():
        if not isinstance(m, DuQuantLinear):
            continue
        w = m.weight
        rows.append(
            {
                "name": name,
                "pack_name": m.name,
                "shape": [m.out_features, m.in_features],
                "precision": f"w{m.w_bits}a{m.a_bits}",
                "backend": m.backend.value,
                "backend_reason": m.backend_reason,
                "kernel": m.kernel.name,
                "device": None if w is None else str(w.device),
                "dtype": None if w is None else str(m.compute_dtype).removeprefix("torch."),
                "weight_dtype": None if w is None else str(w.dtype).removeprefix("torch."),
                "prequantized": m.w_bits < 16,
                "cached": w is not None,
                "prep": "fused" if m.fused else "torch ops",
                "activations": act_status(m),
                "act_calibrated": m.calibrated and m.act_scale is not None,
                "row_rot": m.row_rot,
                "output_rotated": m.output_rotated,
                "note": PROPAGATE_NOTE if m.output_rotated else "",
                "bytes": module_bytes(m),
            }
        )
    return rows
