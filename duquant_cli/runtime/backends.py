"""Backends: how a DuQuant layer stores its weight and runs its matmul.

A backend is a `Kernel`: `prepare` turns a pack layer's stored weight (float `weight`, or
`qweight` codes with `scale`/`zero`) into the buffers the layer keeps, once, at load time;
`linear_t` runs the matmul channels-major on activations already transformed and quantized.
Dynamic activations reach the integer kernels integer-valued (their per-token scale is applied
after the matmul), which is what lets them compute in integers. The dense kernels take them
scaled back (fake quantization) and hold the row restore in their weight, so that their matmul
writes the layer's output with nothing after it but the bias.
"""

from __future__ import annotations

import functools
import logging
from enum import Enum
from typing import TYPE_CHECKING, Protocol

import torch

from duquant_cli.formats.manifest import LayerEntry
from duquant_cli.math.bitpack import unpack_codes
from duquant_cli.math.blocks import BlockDiag, apply_blocks_rows
from duquant_cli.math.quantize import dequantize, sym_zero
from duquant_cli.runtime.gemv import note_layout
from duquant_cli.runtime.support import choose, int4_group

if TYPE_CHECKING:
    from duquant_cli.runtime.layer import DuQuantLinear

log = logging.getLogger("duquant")


class Backend(str, Enum):
    """Weight storage and matmul kernel of a DuQuant layer.

    DENSE: `weight` [out, in], the dequantized transformed weight once in the compute dtype,
        with the row restore folded in (`fold_restore`); `torch.mm`. Every device, dtype and
        pack. The reference the other backends are tested against.
    INT8: `weight` int8 [out, in] (symmetric codes re-centred on 0) and `weight_scale` [out, 1];
        per-token int8 activations and `torch._int_mm` (int32 accumulation). Packs with
        symmetric per-channel weights of <= 8 bits and dynamic symmetric activations of <= 8
        bits (w4a8, w8a8); CPU.
    INT4: `weight` in torch's int4-packed CPU layout, made at load from the pack's codes, and
        `scale_zero` [in / g, out, 2]; `_weight_int4pack_mm_for_cpu` on float activations.
        Weight-only w4a16 packs whose groups (or rows) split into 32-256 wide groups; CPU.
    AUTO: per layer, int4 for w4a16, int8 for what it takes, else dense; `status(model)` says why.
    """

    AUTO = "auto"
    DENSE = "dense"
    INT8 = "int8"
    INT4 = "int4"


class Kernel(Protocol):
    # Runs row-major (`linear_rows`, on h [T, in]) rather than channels-major (`linear_t`).
    rows: bool
    # Its weight holds the row restore (`fold_restore`): the layer keeps no output blocks.
    restores: bool
    # Shown by `status(model)`: "torch" for torch's own ops, "onednn" for prepacked weights.
    name: str

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
        """Channels-major: h [in, T] (transformed, quantized, float32) -> [out, T] in the
        matmul's dtype, before activation scale, bias and row restore."""
        ...


def contiguous_as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t, contiguous and in `dtype`, in one copy (`Tensor.to` ignores `memory_format` when the
    dtype already matches and would hand back the transposed view)."""
    if t.dtype == dtype:
        return t.contiguous()
    return t.to(dtype, memory_format=torch.contiguous_format)


def _codes(entry: LayerEntry, tensors: dict[str, torch.Tensor], device) -> torch.Tensor:
    return unpack_codes(tensors["qweight"].to(device), entry.precision.w_bits, entry.in_features)


def restores_rows(entry: LayerEntry, tensors: dict[str, torch.Tensor]) -> bool:
    """Whether the layer's output is rotated back by the pack's `out` blocks (restore mode)."""
    return entry.transform.get("row_rot", "off") == "restore" and "out" in tensors


def fold_restore(w: torch.Tensor, out: torch.Tensor, tail: torch.Tensor | None) -> torch.Tensor:
    """blockdiag(out)^T @ w, float32 w [out, in]: y' @ blockdiag(out) = x (R^T W')^T, so the
    matmul writes the restored output: with the activations scaled back before it, nothing
    runs after it but the bias (bfloat16 2048x2048 at 64 tokens on an EPYC, old and new code
    side by side: 1.23-1.27x nn.Linear's time -> 1.13-1.18x)."""
    bd = BlockDiag(out.to(w), None if tail is None else tail.to(w))
    return apply_blocks_rows(w, bd.transpose())


class _TorchLayout:
    """Kernels on torch's own tensors: the weight buffer is kept as it is."""

    rows = False
    restores = False
    name = "torch"

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def unpack(self, weight: torch.Tensor) -> torch.Tensor:
        return weight


class DenseKernel(_TorchLayout):
    """Keeps `weight` [out, in] in the compute dtype, the row restore folded in; the matmul is
    `torch.mm`."""

    restores = True

    def prepare(self, entry, tensors, device, dtype):
        if "weight" in tensors:
            w = tensors["weight"].to(device=device, dtype=torch.float32)
        else:
            # Dequantized on the target device: the same float32 ops, so the same bits.
            zero = tensors.get("zero")
            w = dequantize(
                _codes(entry, tensors, device),
                tensors["scale"].to(device),
                None if zero is None else zero.to(device),
                entry.precision.w_bits,
            )
        if restores_rows(entry, tensors):
            w = fold_restore(w, tensors["out"], tensors.get("out_tail"))
        return {"weight": w.to(dtype)}

    def linear_t(self, layer: DuQuantLinear, h: torch.Tensor) -> torch.Tensor:
        w = layer.weight
        if 1 < h.shape[1] < weight_first_from(w.dtype):
            # nn.Linear's operand order, returned as a transposed view: what follows reads
            # either layout.
            return torch.mm(contiguous_as(h.t(), w.dtype), w.t()).t()
        return torch.mm(w, h.to(w.dtype))


def weight_first_from(dtype: torch.dtype) -> int:
    """Fewest tokens at which the dense matmul runs weight-first on channels-major activations.
    With fewer, that order ran 1.5-3.7x slower than nn.Linear's own (x @ W^T, on a row-major
    copy of the few tokens); from there on it was as fast or faster (float32 down to 0.33x
    nn.Linear at 16 tokens). Measured on an EPYC (Zen 4) CPU."""
    return 16 if dtype == torch.float32 else 48


def rows_weight_first(dtype: torch.dtype, tokens: int, in_features: int) -> bool:
    """The operand order of the compiled dense forward, which holds its activations row-major,
    so either order costs no copy. Weight-first from `weight_first_from` tokens, except for
    half-precision layers with 4096 or more inputs: there nn.Linear's own order was faster
    (weight-first 1.07-1.16x its time at 64-256 tokens, on the EPYC; 0.73-0.93x with 2048 or
    fewer inputs, where weight-first stays)."""
    if tokens < weight_first_from(dtype):
        return False
    return dtype == torch.float32 or in_features < 4096


def rows_eagerly(dtype: torch.dtype, tokens: int, in_features: int, shared: bool) -> bool:
    """Whether the eager dense forward runs row-major too, for half-precision layers: where
    its matmul takes nn.Linear's order, which the channels-major forward reaches only through
    a slow transposing copy. That is from `weight_first_from` tokens on where
    `rows_weight_first` says so (bfloat16 2048x16384 at 64 tokens: 1.26x nn.Linear against
    1.43x channels-major), and below it where the input blocks are one matrix up to row scales
    (`shared`), which row-major is one product and one matmul (bfloat16 at 16 tokens:
    1.13-1.27x against 1.17-1.33x for the pi0.5 MLP shapes, 1.31-1.50x against 1.56-1.60x for
    2048x2048; EPYC)."""
    if dtype == torch.float32 or tokens < 2:
        return False
    if tokens < weight_first_from(dtype):
        return shared
    return not rows_weight_first(dtype, tokens, in_features)


class Int8Kernel(_TorchLayout):
    """int8 weight codes and `torch._int_mm(weight, activations)`: weight-first, since that
    operand order is also the right one for a single token (the other order returns wrong
    results on CPU for one row in torch 2.13)."""

    def prepare(self, entry, tensors, device, dtype):
        codes = _codes(entry, tensors, device).to(torch.int16) - sym_zero(entry.precision.w_bits)
        return {
            "weight": codes.to(torch.int8),
            "weight_scale": tensors["scale"].to(device=device, dtype=torch.float32),
        }

    def linear_t(self, layer: DuQuantLinear, h: torch.Tensor) -> torch.Tensor:
        acc = torch._int_mm(layer.weight, h.to(torch.int8))
        return torch.mul(acc, layer.weight_scale)


class Int4Kernel(_TorchLayout):
    """torch's int4-packed weight-only CPU matmul, for one token at a time (decode): it streams
    a quarter of the bf16 bytes; with many tokens the dense backend is faster."""

    def prepare(self, entry, tensors, device, dtype):
        n = entry.in_features
        scale = tensors["scale"].float()
        g = int4_group(n, n // scale.shape[1])
        assert g is not None  # choose_backend checked it
        scale = scale.repeat_interleave(n // scale.shape[1] // g, dim=1)  # [out, n / g]
        zero = tensors.get("zero")
        # (code - z) * s == (code - 8) * s + (8 - z) * s: torch's layout takes a float zero.
        if zero is None:
            fzero = torch.zeros_like(scale)
        else:
            z = zero.float().repeat_interleave(n // zero.shape[1] // g, dim=1)
            fzero = (8 - z) * scale
        codes = _codes(entry, tensors, "cpu").to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        scale_zero = torch.stack([scale, fzero], dim=-1).transpose(0, 1).contiguous()
        return {"weight": packed.to(device), "scale_zero": scale_zero.to(device, dtype)}

    def linear_t(self, layer: DuQuantLinear, h: torch.Tensor) -> torch.Tensor:
        g = layer.in_features // layer.scale_zero.shape[0]
        # Eagerly torch's op itself (see `_onednn_linear`)
        op = int4_mm_t if torch.compiler.is_compiling() else _int4_mm_t
        return op(h, layer.weight, g, layer.scale_zero)


def _int4_mm_t(
    h: torch.Tensor, weight: torch.Tensor, group: int, scale_zero: torch.Tensor
) -> torch.Tensor:
    x = contiguous_as(h.t(), scale_zero.dtype)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight, group, scale_zero)
    return y.t().contiguous()


@torch.library.custom_op("duquant::int4_mm_t", mutates_args=())
def int4_mm_t(
    h: torch.Tensor, weight: torch.Tensor, group: int, scale_zero: torch.Tensor
) -> torch.Tensor:
    """Channels-major int4 matmul. An opaque op, so that torch.compile keeps the contiguous
    token-major input the kernel requires (inductor does not for the aten op itself)."""
    return _int4_mm_t(h, weight, group, scale_zero)


@int4_mm_t.register_fake
def _(h: torch.Tensor, weight: torch.Tensor, group: int, scale_zero: torch.Tensor) -> torch.Tensor:
    return h.new_empty(weight.shape[0], h.shape[1], dtype=scale_zero.dtype)


class OneDnnDenseKernel(DenseKernel):
    """The dense weight reordered once, at load, into oneDNN's blocked layout, which
    `nn.Linear` on CPU redoes on every call: the same products (bit-identical in bfloat16).
    The matmul alone took 0.45-0.95x nn.Linear's time in bfloat16 and 0.41-0.81x in float32
    (1-256 tokens, pi0.5's shapes, on an EPYC CPU). CPU, float32 and bfloat16."""

    rows = True
    name = "onednn"

    def prepare(self, entry, tensors, device, dtype):
        return {"weight": self.pack(super().prepare(entry, tensors, device, dtype)["weight"])}

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(weight)

    def unpack(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.to_dense()

    def linear_rows(
        self, layer: DuQuantLinear, h: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """h [T, in] -> h W^T + bias [T, out] in the weight's dtype, rounded once: oneDNN adds
        the float32 bias to its float32 sums."""
        h = h.to(layer.weight.dtype)
        if h.requires_grad or torch.compiler.is_compiling():
            return onednn_linear(h, layer.weight, bias)
        return _onednn_linear(h, layer.weight, bias)  # torch's op itself, see `_onednn_linear`


class OneDnnInt8Kernel(Int8Kernel):
    """The int8 codes prepacked once, at load, for oneDNN's int8 matmul, which also applies
    the per-row weight scale and writes float32: 0.8-0.9x the time of `torch._int_mm` alone,
    without the rescale (16-256 tokens; one token: 1.2x, on an EPYC CPU). oneDNN's fast path
    takes unsigned activations: the codes are shifted by 128 and the shift given as their zero
    point. CPU."""

    rows = True
    name = "onednn"

    def prepare(self, entry, tensors, device, dtype):
        buffers = super().prepare(entry, tensors, device, dtype)
        return buffers | {"weight": self.pack(buffers["weight"])}

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        packed = torch.ops.onednn.qlinear_prepack(weight, None)
        note_layout(weight, packed)  # whether `Gemv` may read it (once per shape)
        return packed

    def unpack(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.to_dense().t().contiguous()  # oneDNN holds it [in, out]

    def linear_rows(self, layer: DuQuantLinear, h: torch.Tensor) -> torch.Tensor:
        """Integer-valued h [T, in] in [-128, 127] (or already its uint8 codes + 128) ->
        (h W^T) * weight_scale [T, out] float32."""
        u = h
        if h.dtype != torch.uint8:
            u = (torch.add(h, 128) if h.requires_grad else h.add_(128)).to(torch.uint8)
        # Eagerly torch's op itself (see `_onednn_linear`)
        op = onednn_qlinear if torch.compiler.is_compiling() else _onednn_qlinear
        return op(u, layer.weight, layer.weight_scale.view(-1))


def _onednn_linear(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """torch's op, which the kernels call eagerly rather than through the custom ops (which
    torch.compile and autograd need): a custom op's first call took 1.0 s (once per process),
    and every call after it 6-8 us more than the op itself (a 256x256 one-token matmul: 20-30 us,
    on an EPYC)."""
    return torch.ops.mkldnn._linear_pointwise(h, weight, bias, "none", [], "")


@torch.library.custom_op("duquant::onednn_linear", mutates_args=())
def onednn_linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """h @ W^T + bias with W prepacked by oneDNN. An opaque op: torch.compile cannot trace a
    prepacked tensor."""
    return _onednn_linear(h, weight, bias)


@onednn_linear.register_fake
def _(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return h.new_empty(h.shape[0], weight.shape[0])


def _linear_setup(ctx, inputs, output) -> None:
    ctx.weight = inputs[1]


def _linear_backward(ctx, grad: torch.Tensor):
    return torch.mm(grad, ctx.weight.to_dense()), None, None


onednn_linear.register_autograd(_linear_backward, setup_context=_linear_setup)

_ZERO = torch.zeros((), dtype=torch.int64)  # the weights' zero point: symmetric codes


def _onednn_qlinear(u: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.ops.onednn.qlinear_pointwise(
        u, 1.0, 128, weight, scale, _ZERO, None, 1.0, 0, torch.float32, "none", [], ""
    )


@torch.library.custom_op("duquant::onednn_qlinear", mutates_args=())
def onednn_qlinear(u: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """uint8 u (codes + 128) [T, in] -> float32 ((u - 128) W^T) * scale, W prepacked."""
    return _onednn_qlinear(u, weight, scale)


@onednn_qlinear.register_fake
def _(u: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return u.new_empty(u.shape[0], weight.shape[1], dtype=torch.float32)


KERNELS: dict[Backend, Kernel] = {
    Backend.DENSE: DenseKernel(),
    Backend.INT8: Int8Kernel(),
    Backend.INT4: Int4Kernel(),
}
ONEDNN: dict[Backend, Kernel] = {
    Backend.DENSE: OneDnnDenseKernel(),
    Backend.INT8: OneDnnInt8Kernel(),
}


@functools.cache
def _onednn_runs(backend: Backend, dtype: torch.dtype) -> bool:
    """Whether this torch build and CPU run the oneDNN kernel (bfloat16 needs AVX-512 at least):
    tried once: a small weight packed and unpacked comes back unchanged."""
    if not torch.backends.mkldnn.is_available():
        return False
    packed = ONEDNN[backend]
    w = torch.arange(-8, 8, dtype=torch.float32).view(4, 4)
    w = w.to(torch.int8) if backend is Backend.INT8 else w.to(dtype)
    try:
        return torch.equal(packed.unpack(packed.pack(w)), w)
    except RuntimeError:
        return False


def kernel_for(backend: Backend, device: torch.device, dtype: torch.dtype) -> Kernel:
    """A backend's kernel on `device` for a `dtype` model: oneDNN's prepacked ones on CPU where
    they run (dense: float32 and bfloat16), torch's own elsewhere."""
    if backend is Backend.INT8:
        dtype = torch.float32  # its activations are quantized in float32 whatever the model's
    if device.type == "cpu" and backend in ONEDNN and dtype in (torch.float32, torch.bfloat16):
        return ONEDNN[backend] if _onednn_runs(backend, dtype) else KERNELS[backend]
    return KERNELS[backend]


def choose_backend(
    requested: Backend, device: torch.device, dtype: torch.dtype, entry: LayerEntry
) -> tuple[Backend, str]:
    """(backend, reason) for one layer (see `support.choose`); the reason is shown by
    `status(model)`. A requested integer backend that cannot run the layer is logged."""
    backend, why = choose(requested.value, device.type, entry, str(dtype).removeprefix("torch."))
    if requested not in (Backend.AUTO, Backend(backend)):
        log.warning(
            "%s: %s backend not possible (%s); using dense",
            entry.name,
            requested.value,
            why.split(": ", 1)[1],
        )
    return Backend(backend), why
