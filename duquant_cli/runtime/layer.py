"""`DuQuantLinear`: an nn.Linear replacement serving a packed layer from cached buffers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from duquant_cli.formats.pack import LayerEntry
from duquant_cli.math.bitpack import unpack_codes
from duquant_cli.math.quantize import dequantize, fake_quant_per_token, fake_quant_static
from duquant_cli.runtime.backends import Backend

_BLOCK_FIELDS = ("in1", "in1_tail", "in2", "in2_tail", "out", "out_tail")
ACT_DYNAMIC, ACT_STATIC, ACT_NONE = "dynamic", "static", "none"


def _blocks(x: torch.Tensor, blocks: torch.Tensor, tail: torch.Tensor | None) -> torch.Tensor:
    """x [T, n] @ blockdiag(blocks, tail): one batched matmul (plus one for a tail block)."""
    t = x.shape[0]
    nb, b, _ = blocks.shape
    head = nb * b
    y = torch.bmm(x[:, :head].reshape(t, nb, b).transpose(0, 1), blocks)
    y = y.transpose(0, 1).reshape(t, head)
    if tail is None:
        return y
    return torch.cat([y, x[:, head:] @ tail], dim=1)


class DuQuantLinear(nn.Module):
    """A linear layer whose input is transformed, quantized, and multiplied by a pre-quantized,
    pre-transformed weight, then restored.

    Buffers (None when the pack has no such transform), all on one device:
        perm: int64 [in]; in1, in2: [n_blocks, B, B], in1_tail, in2_tail: [t, t];
        out: [n_row_blocks, Bo, Bo], out_tail; weight: [out, in] (dense backend), bias: [out];
        act_scale: [in] static per-channel activation scales (transformed basis).
    Floating buffers are in the compute dtype; `model.to(...)` moves and casts them.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        w_bits: int,
        a_bits: int,
        row_rot: str = "restore",
        act_asym: bool = False,
        act_clip: float = 1.0,
        name: str = "",
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.w_bits = w_bits
        self.a_bits = a_bits
        self.row_rot = row_rot
        self.act_asym = act_asym
        self.act_clip = act_clip
        self.name = name
        self.backend = Backend.DENSE
        self.backend_reason = ""
        self.act_mode = ACT_DYNAMIC if a_bits < 16 else ACT_NONE
        self.calibrated = False
        self.observer: object | None = None
        for f in ("perm", *_BLOCK_FIELDS, "weight", "bias", "act_scale"):
            self.register_buffer(f, None)

    @classmethod
    def from_pack(
        cls,
        entry: LayerEntry,
        tensors: dict[str, torch.Tensor],
        *,
        bias: torch.Tensor | None,
        device: torch.device,
        dtype: torch.dtype,
        backend: Backend = Backend.DENSE,
        reason: str = "",
    ) -> DuQuantLinear:
        """Build from a pack entry's tensors; `bias` is the model's own (unrotated) bias."""
        q = entry.quant
        layer = cls(
            entry.in_features,
            entry.out_features,
            w_bits=entry.precision.w_bits,
            a_bits=entry.precision.a_bits,
            row_rot=entry.transform.get("row_rot", "off"),
            act_asym=q.get("act_scheme") == "asym",
            act_clip=float(q.get("act_clip", 1.0)),
            name=entry.name,
        )
        layer.backend, layer.backend_reason = backend, reason

        def put(t: torch.Tensor) -> torch.Tensor:
            t = t.to(device)
            return t.to(dtype) if t.is_floating_point() else t

        if "perm" in tensors:
            layer.perm = tensors["perm"].to(device=device, dtype=torch.int64)
        for f in _BLOCK_FIELDS:
            if f in tensors:
                setattr(layer, f, put(tensors[f]))
        if "weight" in tensors:
            layer.weight = put(tensors["weight"])
        else:
            codes = unpack_codes(tensors["qweight"], entry.precision.w_bits, entry.in_features)
            w = dequantize(codes, tensors["scale"], tensors.get("zero"), entry.precision.w_bits)
            layer.weight = w.to(device=device, dtype=dtype)
        b = tensors.get("bias", bias)
        if b is not None:
            layer.bias = put(b.detach())
        if "act_scale" in tensors and layer.a_bits < 16:
            layer.act_scale = put(tensors["act_scale"])
            layer.act_mode, layer.calibrated = ACT_STATIC, True
        if layer.row_rot != "restore":
            layer.out = layer.out_tail = None  # propagate: output stays rotated
        return layer

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] in the packed basis: in1 blocks, permutation, in2 blocks."""
        if self.in1 is not None:
            x = _blocks(x, self.in1, self.in1_tail)
        if self.perm is not None:
            x = x.index_select(1, self.perm)
        if self.in2 is not None:
            x = _blocks(x, self.in2, self.in2_tail)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = self.transform_input(x.reshape(-1, self.in_features))
        if self.observer is not None:
            self.observer(self, x)
        if self.act_mode == ACT_DYNAMIC and not self.act_asym:
            # Per-token symmetric: the token scale factors out of the matmul.
            qmax = (1 << (self.a_bits - 1)) - 1
            scale = (x.abs().amax(1, keepdim=True) * (self.act_clip / qmax)).clamp_min(1e-8)
            q = torch.round(x / scale)
            if self.act_clip < 1.0:
                q = q.clamp(-qmax - 1, qmax)
            y = F.linear(q, self.weight) * scale
        else:
            if self.act_mode == ACT_DYNAMIC:
                x = fake_quant_per_token(x, self.a_bits, True, self.act_clip)
            elif self.act_mode == ACT_STATIC and self.act_scale is not None:
                x = fake_quant_static(x, self.act_scale, self.a_bits)
            y = F.linear(x, self.weight)
        if self.out is not None:
            y = _blocks(y, self.out, self.out_tail)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"w{self.w_bits}a{self.a_bits}, backend={self.backend.value}, act={self.act_mode}"
        )
