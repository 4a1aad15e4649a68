"""Backends: how a DuQuant layer stores its weight and runs its matmul."""

from __future__ import annotations

from enum import Enum

import torch


class Backend(str, Enum):
    """Weight storage and matmul kernel of a DuQuant layer.

    DENSE: the dequantized transformed weight, once, in the compute dtype ([out, in]); plain
        `F.linear`. Bit-identical to codes x scales; works on every device and dtype. The
        reference every other backend is tested against.
    AUTO: pick the fastest backend the device, dtype and precision allow (today: DENSE).
    """

    AUTO = "auto"
    DENSE = "dense"


def choose_backend(
    requested: Backend, device: torch.device, dtype: torch.dtype, w_bits: int, a_bits: int
) -> tuple[Backend, str]:
    """(backend, reason): the reason is shown by `status(model)`."""
    if requested is Backend.DENSE:
        return Backend.DENSE, "requested"
    return Backend.DENSE, f"auto: dense on {device.type}/{str(dtype).removeprefix('torch.')}"
