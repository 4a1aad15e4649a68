"""Backends: how a DuQuant layer stores its weight and runs its matmul.

A backend is a `Kernel`: `prepare` turns a pack layer's stored weight (float `weight`, or
`qweight` codes with `scale`/`zero`) into the buffers the layer keeps, once, at load time;
`linear` runs the matmul on activations that are already transformed and quantized. For dynamic
activations those are integer-valued (the per-token scale is applied after the matmul), so an
integer backend of a later issue can add its kernel here without touching the layer.
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, Protocol

import torch

from duquant_cli.formats.pack import LayerEntry
from duquant_cli.math.bitpack import unpack_codes
from duquant_cli.math.quantize import dequantize

if TYPE_CHECKING:
    from duquant_cli.runtime.layer import DuQuantLinear


class Backend(str, Enum):
    """Weight storage and matmul kernel of a DuQuant layer.

    DENSE: the dequantized transformed weight, once, in the compute dtype ([out, in]); plain
        `F.linear`. Bit-identical to `dequantize(codes, scale, zero)` cast to the compute dtype;
        works on every device and dtype. The reference every other backend is tested against.
    AUTO: pick the fastest backend the device, dtype and precision allow (today: DENSE).
    """

    AUTO = "auto"
    DENSE = "dense"


class Kernel(Protocol):
    def prepare(
        self,
        entry: LayerEntry,
        tensors: dict[str, torch.Tensor],
        device: torch.device,
        dtype: torch.dtype,
    ) -> dict[str, torch.Tensor]:
        """The weight buffers the layer keeps (names -> tensors on `device`)."""
        ...

    def linear_t(self, layer: DuQuantLinear, h: torch.Tensor) -> torch.Tensor:
        """Channels-major: h [in, T] (transformed, quantized) -> [out, T], before row restore,
        scale and bias."""
        ...


class DenseKernel:
    """Keeps `weight` [out, in] in the compute dtype; the matmul is `F.linear`."""

    def prepare(
        self,
        entry: LayerEntry,
        tensors: dict[str, torch.Tensor],
        device: torch.device,
        dtype: torch.dtype,
    ) -> dict[str, torch.Tensor]:
        if "weight" in tensors:
            return {"weight": tensors["weight"].to(device=device, dtype=dtype)}
        bits = entry.precision.w_bits
        # Dequantized on the target device: the same float32 ops, so the same bits, only faster.
        codes = unpack_codes(tensors["qweight"].to(device), bits, entry.in_features)
        zero = tensors.get("zero")
        w = dequantize(
            codes,
            tensors["scale"].to(device),
            None if zero is None else zero.to(device),
            bits,
        )
        return {"weight": w.to(dtype)}

    def linear_t(self, layer: DuQuantLinear, h: torch.Tensor) -> torch.Tensor:
        return torch.mm(layer.weight, h)


KERNELS: dict[Backend, Kernel] = {Backend.DENSE: DenseKernel()}


def choose_backend(
    requested: Backend, device: torch.device, dtype: torch.dtype, w_bits: int, a_bits: int
) -> tuple[Backend, str]:
    """(backend, reason): the reason is shown by `status(model)`."""
    if requested is Backend.DENSE:
        return Backend.DENSE, "requested"
    where = f"{device.type}/{str(dtype).removeprefix('torch.')}"
    return Backend.DENSE, f"auto: dense, the only backend so far ({where})"
