"""`status(model)`: what each DuQuant layer of a live model runs with."""

from __future__ import annotations

from torch import nn

from duquant_cli.runtime.layer import ACT_STATIC, DuQuantLinear


def act_status(layer: DuQuantLinear) -> str:
    if layer.act_mode == ACT_STATIC:
        return "static (calibrated)" if layer.act_scale is not None else "static (uncalibrated)"
    return layer.act_mode


def status(model: nn.Module) -> list[dict]:
    """One row per DuQuant layer: backend (and why), device, dtype, precision, whether the
    weight is pre-quantized and cached, activation mode, bytes held.

    This is how a user checks the fast path is on: every row should say `cached: True`.
    """
    rows = []
    for name, m in model.named_modules():
        if not isinstance(m, DuQuantLinear):
            continue
        held = list(m.buffers(recurse=False)) + list(m.parameters(recurse=False))
        rows.append(
            {
                "name": name,
                "shape": [m.out_features, m.in_features],
                "precision": f"w{m.w_bits}a{m.a_bits}",
                "backend": m.backend.value,
                "backend_reason": m.backend_reason,
                "device": str(m.weight.device),
                "dtype": str(m.weight.dtype).removeprefix("torch."),
                "cached": m.weight is not None,
                "prequantized": m.w_bits < 16,
                "activations": act_status(m),
                "row_rot": m.row_rot,
                "bytes": sum(t.numel() * t.element_size() for t in held),
            }
        )
    return rows
