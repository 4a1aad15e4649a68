"""`DuQuantLinear`: an nn.Linear replacement serving a packed layer from cached buffers.

The forward is the math of `duquant_cli.math.layer_pack`'s docstring, with every transform
prepared once at load time: one gather and one batched block matmul per transform, activation
quantization, the matmul, the row restore (or not), the bias. No Python branching on tensor
values, so `torch.compile(fullgraph=True)` traces it whole.

Everything but the matmul runs in float32 whatever the model's dtype: the transforms, the
activation quantization, the scale, bias and restore. Those are a few small ops on activations;
float32 ops are the fast ones on CPU and cheap anywhere, and the quantization grid is then the
same in every dtype. Only the matmul runs in the weight's dtype (or in integers). The dense
backend's weight holds the restore and its matmul takes the activations scaled back, so that
it writes the output (see `backends`).
"""

from __future__ import annotations

import itertools
import math
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from duquant_cli.errors import ConfigError, MismatchError
from duquant_cli.formats.pack import LayerEntry
from duquant_cli.math.bitpack import packed_cols
from duquant_cli.math.blocks import apply_blocks, block_row_scales
from duquant_cli.math.permutation import is_permutation
from duquant_cli.runtime import prep
from duquant_cli.runtime.backends import (
    KERNELS,
    Backend,
    Kernel,
    choose_backend,
    contiguous_as,
    fold_restore,
    kernel_for,
    restores_rows,
    rows_eagerly,
    rows_weight_first,
)
from duquant_cli.runtime.gemv import GEMV_ROWS, Gemv
from duquant_cli.runtime.prep import DTYPES, Finish, Prep

_BLOCK_FIELDS = ("in1", "in1_tail", "in2", "in2_tail", "out", "out_tail")
# Derived at load, not saved: the row scales of block stacks that are one matrix up to them.
_ROW_SCALE_FIELDS = ("in1_row_scales", "in2_row_scales", "out_row_scales")
# Held in float32 whatever the model's dtype: `model.to(dtype)` moves them but does not cast.
FLOAT32_FIELDS = (*_BLOCK_FIELDS, *_ROW_SCALE_FIELDS, "bias", "act_scale", "weight_scale")
FIELDS = ("perm", *_BLOCK_FIELDS, "weight", "qweight", "scale", "zero", "bias", "act_scale")
_FLOATS = ("float32", "float16", "bfloat16")
ACT_DYNAMIC, ACT_STATIC, ACT_NONE = "dynamic", "static", "none"
# Floor of static activation scales (float16's smallest normal, as packs written for float16
# runtimes expect): a channel that never fired keeps a usable scale.
ACT_SCALE_MIN = 2.0**-14


def _per_block(
    v: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor | None = None
) -> torch.Tensor:
    """R_k^T v_k for every block: v [n_blocks, B, T] -> [n_blocks, B, T], one batched matmul
    reading R transposed in place. One token, with every block R_0 up to row scales (`scales`,
    see `block_row_scales`): the scaled rows times R_0 in one mm (9 / 15 us over 2048 / 16384
    channels on an EPYC); other blocks: each block's products summed elementwise (18 / 45 us),
    where a batched matrix-vector product reading R transposed ran 2-3x slower still."""
    nb, b, t = v.shape
    if t == 1 and scales is not None:
        return torch.mm(v.view(nb, b) * scales, blocks[0]).view(nb, b, 1)
    if t == 1:
        return (v * blocks).sum(1).unsqueeze(-1)
    return torch.bmm(blocks.mT, v)


def _blocks_t(
    h: torch.Tensor, blocks: torch.Tensor, tail: torch.Tensor | None, scales: torch.Tensor | None
) -> torch.Tensor:
    """Channels-major x @ blockdiag(R, tail): h = x^T [n, T] -> [n, T], one batched matmul (plus
    one mm for a tail block), with no transpose copy."""
    t = h.shape[1]
    nb, b, _ = blocks.shape
    head = nb * b
    y = _per_block(h[:head].view(nb, b, t), blocks, scales).view(head, t)
    return y if tail is None else torch.cat([y, torch.mm(tail.t(), h[head:])], dim=0)


def _blocks_from_rows(
    x: torch.Tensor, blocks: torch.Tensor, tail: torch.Tensor | None, scales: torch.Tensor | None
) -> torch.Tensor:
    """Row-major x [T, n] -> channels-major (x @ blockdiag(R))^T [n, T]: one batched matmul
    reading x in place as [n_blocks, B, T] (strided), so the transpose costs no copy of its own."""
    t = x.shape[0]
    nb, b, _ = blocks.shape
    head = nb * b
    y = _per_block(x[:, :head].view(t, nb, b).permute(1, 2, 0), blocks, scales).view(head, t)
    if tail is None:
        return y
    return torch.cat([y, torch.mm(tail.t(), x[:, head:].t())], 0)


def _restore_rows(
    y: torch.Tensor,
    blocks: torch.Tensor,
    tail: torch.Tensor | None,
    scales: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Channels-major y' [out, T] -> row-major y' @ blockdiag(out) [T, out] in `dtype`: one
    batched matmul reading y' transposed and writing block-major [n_blocks, T, B], then one copy
    with contiguous runs of B: the row restore and the layout change for the price of one. One
    token: per-block products summed elementwise (see `_per_block`), already row-major."""
    y = y.to(blocks.dtype)
    t = y.shape[1]
    nb, b, _ = blocks.shape
    head = nb * b
    res = y.new_empty(t, y.shape[0], dtype=dtype)
    if t == 1:
        res[:, :head].view(nb, b, 1).copy_(_per_block(y[:head].view(nb, b, 1), blocks, scales))
    else:
        z = torch.bmm(y[:head].view(nb, b, t).mT, blocks)
        res[:, :head].view(t, nb, b).copy_(z.transpose(0, 1))
    if tail is not None:
        res[:, head:].copy_(torch.mm(y[head:].t(), tail))
    return res


# Inner size (tokens) at which torch's CPU reductions over the leading dim vectorize: with
# T = 16, 24 or 48 they ran 10-30x slower than with T = 32 or 64 (amax over a [16384, 16]: 0.7 ms).
_REDUCE_INNER = 64


def _token_min_max(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (min, max) of channels-major h [in, T], each [1, T]. For T > 1 h is viewed as
    [in / k, k * T] with k * T a multiple of `_REDUCE_INNER` where `in` allows, and the k
    partial results reduced after: the same values, on the fast path of any token count."""
    n, t = h.shape
    if torch.compiler.is_compiling():  # the fold is for eager CPU kernels; inductor fuses these
        return h.amin(0, keepdim=True), h.amax(0, keepdim=True)
    k = _REDUCE_INNER // math.gcd(t, _REDUCE_INNER) if t > 1 else 1
    if n % k:
        k = 1
    hv = h.view(n // k, k * t)
    lo, hi = hv.amin(0, keepdim=True), hv.amax(0, keepdim=True)
    if k == 1:
        return lo, hi
    return lo.view(k, t).amin(0, keepdim=True), hi.view(k, t).amax(0, keepdim=True)


@dataclass(frozen=True)
class _RowBlocks:
    """A block transform as the row-major forward applies it, with its views taken once:
    `first` (R_0) and the flat row `scales` where every block is R_0 up to them."""

    blocks: torch.Tensor
    tail: torch.Tensor | None
    scales: torch.Tensor | None
    first: torch.Tensor | None

    @classmethod
    def of(
        cls, blocks: torch.Tensor | None, tail: torch.Tensor | None, scales: torch.Tensor | None
    ) -> _RowBlocks | None:
        if blocks is None:
            return None
        if scales is None:
            return cls(blocks, tail, None, None)
        return cls(blocks, tail, scales.reshape(-1), blocks[0])

    def __call__(self, h: torch.Tensor, compiling: bool) -> torch.Tensor:
        """Row-major h [T, n] -> h @ blockdiag(R, tail) [T, n], h this forward's own (its rows
        may be scaled in place). Compiled, as a product summed over each block: the form
        inductor fuses with what comes before into one loop, vectorized along R's rows; by R_0
        after the row scaling where the blocks share it (bfloat16 2048x2048 at 64 tokens, a
        model's layers compiled one by one: 1.14-1.18x nn.Linear against 1.27x by the stack).
        Eagerly, with every block R_0 up to row scales, one product and one matmul of h's rows
        viewed [T * n_blocks, B] by R_0; else (where that product would materialize
        [T, n_blocks, B, B]) one batched matmul over h's rows viewed [n_blocks, T, B], then one
        copy with contiguous runs of B: 2-3x the time of the shared form (1.0 ms against 0.3 ms
        for [64, 16384] on an EPYC). A calibrated pack's first transform (smoothing folded in)
        takes the shared form too: bfloat16 2048x16384 at 64 tokens went from 1.27-1.28x
        nn.Linear's time to 1.16x, int8 from 0.86-0.89x to 0.72-0.77x."""
        t = h.shape[0]
        nb, b, _ = self.blocks.shape
        head = nb * b
        hv = h[:, :head]
        if compiling and self.first is not None:  # R_0 stays in cache, the block stack not
            y = ((hv * self.scales).reshape(t, nb, b, 1) * self.first).sum(2).view(t, head)
        elif compiling:
            y = (hv.reshape(t, nb, b, 1) * self.blocks).sum(2).view(t, head)
        elif self.first is not None:
            hv = torch.mul(hv, self.scales) if hv.requires_grad else hv.mul_(self.scales)
            y = torch.mm(hv.reshape(t * nb, b), self.first).view(t, head)
        else:
            y = h.new_empty(t, head)
            z = torch.bmm(hv.reshape(t, nb, b).transpose(0, 1), self.blocks)
            y.view(t, nb, b).copy_(z.transpose(0, 1))
        return y if self.tail is None else torch.cat([y, torch.mm(h[:, head:], self.tail)], 1)


@dataclass(frozen=True)
class _RowPlan:
    """What `forward_rows` reads, gathered once per layer state (eagerly cached, dropped when
    anything is set on the layer). In a model, with the weights out of cache, reading them
    through module attribute lookups and taking their views per call cost 60-150 us a call
    on an EPYC at 1-16 tokens: int8 2048x2048 in bfloat16 took 0.78-1.06x nn.Linear's time
    that way, 0.66-0.87x this one."""

    perm: torch.Tensor | None
    in1: _RowBlocks | None
    in2: _RowBlocks | None
    out: _RowBlocks | None
    bias: torch.Tensor | None
    act_scale: torch.Tensor | None
    act_mode: str
    kernel: Kernel
    dense: bool
    observer: object | None
    prep: Prep | None  # the fused activation path, where it runs this layer (`runtime.prep`)
    finish: Finish | None  # and the int8 tail: scale, bias, restore, cast
    gemv: Gemv | None  # the int8 matmul at one to four tokens (`runtime.gemv`)


def _fake_quant(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Integer-valued q scaled back by its per-token scale, before the dense matmul: in place
    where autograd does not need q (it is the forward's own)."""
    return torch.mul(q, scale) if q.requires_grad else q.mul_(scale)


def _gather_columns(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """x[:, perm] in float32, as a new tensor. Half-precision x is gathered before the cast, as
    int16: torch.gather moved those two-byte elements in a third of the time the float32 gather
    took, where torch's own half-precision gather kernels ran 2-4x slower than float32's. (A
    bit view has no gradient: under autograd the gather follows the cast.)"""
    if x.element_size() != 2 or x.requires_grad:
        return x.float().index_select(1, perm)
    x = x.contiguous()
    codes = torch.gather(x.view(torch.int16), 1, perm.expand(x.shape[0], -1))
    return codes.view(x.dtype).float()


def _fold_saved_restore(state: dict, prefix: str) -> None:
    """A dense layer's state dict of format 2 or 3 (`out` kept, the weight without it, the bias
    rotated back by it) as format 4 holds it: the restore folded into the weight, the bias
    rotated forward again (b R^T R = b)."""
    out, tail = state.pop(prefix + "out"), state.pop(prefix + "out_tail", None)
    w = state[prefix + "weight"]
    state[prefix + "weight"] = fold_restore(w.float(), out, tail).to(w.dtype)
    if prefix + "bias" in state:
        b = state[prefix + "bias"].float()
        state[prefix + "bias"] = apply_blocks(b, out.to(b), None if tail is None else tail.to(b))


def _block_problems(refs: dict, field: str, dim: int) -> list[str]:
    blocks, tail = refs.get(field), refs.get(field + "_tail")
    if blocks is None:
        return [f"{field}_tail without {field}"] if tail is not None else []
    s = blocks.shape
    if len(s) != 3 or s[1] != s[2] or s[1] < 1:
        return [f"{field} is {list(s)}, expected [n_blocks, B, B]"]
    t = 0
    if tail is not None:
        if len(tail.shape) != 2 or tail.shape[0] != tail.shape[1]:
            return [f"{field}_tail is {list(tail.shape)}, expected square"]
        t = tail.shape[0]
    if s[0] * s[1] + t != dim:
        return [f"{field} covers {s[0] * s[1] + t} channels, the layer has {dim}"]
    odd = [f for f in (field, field + "_tail") if f in refs and refs[f].dtype not in _FLOATS]
    return [f"{f} is {refs[f].dtype}, expected a float dtype" for f in odd]


def entry_problems(entry: LayerEntry) -> list[str]:
    """Every way a pack entry's tensors (as its manifest lists them) fail to make a layer of its
    shape, each prefixed by the layer name; empty when they fit. Checked before loading."""
    o, n, refs = entry.out_features, entry.in_features, entry.tensors
    probs = [
        f"unknown tensor {f!r} (a pack from a newer duquant?)" for f in refs if f not in FIELDS
    ]

    def want(f: str, shape: tuple[int, ...], dtypes: tuple[str, ...]) -> None:
        if f not in refs:
            return
        if refs[f].shape != shape:
            probs.append(f"{f} is {list(refs[f].shape)}, expected {list(shape)}")
        elif refs[f].dtype not in dtypes:
            probs.append(f"{f} is {refs[f].dtype}, expected {'/'.join(dtypes)}")

    want("perm", (n,), ("int64", "int32"))
    probs += _block_problems(refs, "in1", n) + _block_problems(refs, "in2", n)
    probs += _block_problems(refs, "out", o)
    bits = entry.precision.w_bits
    if entry.precision.quantize_weight:
        if "qweight" not in refs or "scale" not in refs:
            probs.append(f"w{bits} layer without qweight and scale")
        want("qweight", (o, packed_cols(n, bits)), ("uint8",))
        groups = refs["scale"].shape[-1] if "scale" in refs else 1
        if groups < 1 or n % groups:
            probs.append(f"scale has {groups} groups, which do not divide {n} inputs")
        else:
            want("scale", (o, groups), ("float32",))
            want("zero", (o, groups), ("uint8",))
    elif "weight" not in refs:
        probs.append("w16 layer without weight")
    want("weight", (o, n), _FLOATS)
    want("bias", (o,), _FLOATS)
    want("act_scale", (n,), _FLOATS)
    return [f"{entry.name}: {p}" for p in probs]


# Every layer by a key of its own, which a compiled graph holds as a constant (`fused_rows`).
_LAYERS: weakref.WeakValueDictionary[int, DuQuantLinear] = weakref.WeakValueDictionary()
_KEYS = itertools.count()


def _register(layer: DuQuantLinear) -> int:
    key = next(_KEYS)
    _LAYERS[key] = layer
    return key


@torch.library.custom_op("duquant::fused_rows", mutates_args=())
def fused_rows(x: torch.Tensor, key: int) -> torch.Tensor:
    """The layer `key`'s eager fused forward (`forward_rows`: its plan, the C code, its
    kernel) as one opaque op, for torch.compile: the compiled graph gives eager's bits, reads
    the layer's current buffers, and pays one op call a layer (three separate ops, each
    checking its tensors again, cost a compiled SmolLM2 a third more than eager at one token)."""
    return _LAYERS[key].forward_rows(x)


@fused_rows.register_fake
def _(x: torch.Tensor, key: int) -> torch.Tensor:
    layer = _LAYERS[key]
    dtype = x.dtype if layer.backend is Backend.INT8 else layer.weight.dtype
    return x.new_empty(x.shape[0], layer.out_features, dtype=dtype)


class DuQuantLinear(nn.Module):
    """A linear layer whose input is transformed, quantized, and multiplied by a pre-quantized,
    pre-transformed weight, then restored.

    Buffers (None when the pack has no such transform), all on one device:
        perm: int64 [in]; in1, in2: [n_blocks, B, B], in1_tail, in2_tail: [t, t]; out:
        [n_row_blocks, Bo, Bo], out_tail (restore mode, integer backends: dense folds the
        restore into its weight); every block as the pack stores it (the channels-major eager
        forward reads the input blocks transposed in place, the compiled form as stored: the
        layout inductor vectorizes);
        bias: [out], rotated back by the restore's R^T where `out` is kept (so that it is
        added before the restore) or by the pack (propagate mode);
        act_scale: [in] static per-channel activation scales, in the transformed basis;
        the backend's weight buffers (see `Backend`): in the compute dtype for dense and int4.
    The blocks, bias and scales stay float32 (`FLOAT32_FIELDS`): `model.to(...)` moves every
    buffer and casts only the weight's. `state_dict()` holds them all (a calibrated
    `act_scale` loads back into a fresh layer).

    In propagate mode (`output_rotated`) the output is y R^T with R the pack's `out` blocks:
    only a consumer that absorbs R makes the model exact.
    """

    # State dict layout: 2 stores `out` untransposed and `bias` rotated back by the restore;
    # 3 also stores the input blocks untransposed (2's are transposed on loading); 4 has dense
    # layers fold the restore into the weight, with the bias as it is (2 and 3's are folded on
    # loading).
    _version = 4

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
        self.output_rotated = False
        self.act_asym = act_asym
        self.act_clip = act_clip
        self.name = name
        self.backend = Backend.DENSE
        self.kernel = KERNELS[Backend.DENSE]
        self.backend_reason = ""
        self.act_mode = ACT_DYNAMIC if a_bits < 16 else ACT_NONE
        self.calibrated = False
        self.act_percentile: float | None = None
        self.observer: object | None = None
        self.inputs_shared = False  # every input block transform (if any) one matrix up to scales
        self.use_fused = True  # False: the activation path as torch ops even where C runs it
        self._key = _register(self)  # what compiled graphs call it by (`fused_rows`)
        for f in ("perm", *_BLOCK_FIELDS, "weight", "bias", "act_scale"):
            self.register_buffer(f, None)
        for f in _ROW_SCALE_FIELDS:
            self.register_buffer(f, None, persistent=False)

    @classmethod
    def from_pack(
        cls,
        entry: LayerEntry,
        tensors: dict[str, torch.Tensor],
        *,
        bias: torch.Tensor | None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        backend: Backend = Backend.DENSE,
        reason: str = "",
    ) -> DuQuantLinear:
        """Build from a pack entry's tensors; `bias` is the model's own (unrotated) bias, used
        unless the pack stores a rotated one (propagate mode)."""
        problems = entry_problems(entry)
        if "perm" in tensors and not is_permutation(tensors["perm"], entry.in_features):
            problems.append(f"{entry.name}: perm is not a permutation of {entry.in_features}")
        if problems:
            raise MismatchError("; ".join(problems))
        device = torch.device(device)
        q = entry.quant
        row_rot = entry.transform.get("row_rot", "off")
        layer = cls(
            entry.in_features,
            entry.out_features,
            w_bits=entry.precision.w_bits,
            a_bits=entry.precision.a_bits,
            row_rot=row_rot,
            act_asym=q.get("act_scheme") == "asym",
            act_clip=float(q.get("act_clip", 1.0)),
            name=entry.name,
        )
        if backend is Backend.AUTO or not reason:
            backend, reason = choose_backend(backend, device, dtype, entry)
        layer.backend, layer.backend_reason = backend, reason
        layer.kernel = kernel_for(backend, device, dtype)

        def put(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=torch.float32)

        if "perm" in tensors:
            layer.perm = tensors["perm"].to(device=device, dtype=torch.int64)
        for f in ("in1", "in1_tail", "in2", "in2_tail"):
            if f in tensors:
                setattr(layer, f, put(tensors[f]))
        # The dense kernels fold the restore into their weight (`fold_restore`).
        restore = restores_rows(entry, tensors) and not layer.kernel.restores
        if restore:
            layer.out = put(tensors["out"])
            if "out_tail" in tensors:
                layer.out_tail = put(tensors["out_tail"])
        layer.output_rotated = row_rot == "propagate" and "out" in tensors
        for f, t in layer.kernel.prepare(entry, tensors, device, dtype).items():
            layer.register_buffer(f, t)
        b = tensors.get("bias", bias)
        if b is not None and restore:
            # Added before the restore, so rotated back by it: b R^T R = b (R orthogonal).
            out_t = tensors["out"].double().mT
            tail = tensors.get("out_tail")
            b = apply_blocks(b.double(), out_t, None if tail is None else tail.double().mT)
        if b is not None:
            layer.bias = put(b.detach())
        if "act_scale" in tensors and layer.a_bits < 16:
            layer.act_scale = put(tensors["act_scale"].float().clamp_min(ACT_SCALE_MIN))
            layer.act_mode, layer.calibrated = ACT_STATIC, True
            layer.act_percentile = q.get("act_percentile")
        layer.note_shared()
        # Gathered now, with the fused code built or loaded and checked (once per process):
        # not in the first forward (SmolLM2's 210 layers: 10 ms).
        layer._row_plan(False)
        return layer

    def note_shared(self) -> None:
        """Find the block transforms that are one matrix up to row scales, and keep their scales
        (`block_row_scales`; derived, so not in the state dict): once, at load and after loading a
        state dict."""
        for f in ("in1", "in2", "out"):
            blocks = getattr(self, f)
            scales = None if blocks is None else block_row_scales(blocks)
            self.register_buffer(f + "_row_scales", scales, persistent=False)
        ins = [f for f in ("in1", "in2") if getattr(self, f) is not None]
        self.inputs_shared = all(getattr(self, f + "_row_scales") is not None for f in ins)

    def use_kernel(self, kernel: Kernel) -> None:
        """Run on `kernel` (one of this backend's), moving the weight buffer into its layout."""
        w = self._buffers.get("weight")
        if w is not None and kernel is not self.kernel:
            self._buffers["weight"] = kernel.pack(self.kernel.unpack(w))
        self.kernel = kernel

    @property
    def plain_weight(self) -> torch.Tensor | None:
        """The weight buffer in torch's layout: itself, or a copy where the kernel prepacked it."""
        return None if self.weight is None else self.kernel.unpack(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channels-major inside (h = x^T, [in, T]): the gather is a row gather of whole
        # channels, the block transforms batched matmuls, and the matmul weight-first, the
        # fastest operand order on CPU. The layout changes ride on the first block transform
        # and on the row restore where there are such (see `_blocks_from_rows`, `_restore_rows`).
        lead, in_dtype = x.shape[:-1], x.dtype
        x = x.reshape(-1, self.in_features)
        # oneDNN's kernels take row-major activations (`forward_rows`). With torch's dense
        # kernel, compiled, the layer traces the form inductor fuses (`forward_rows`), and runs it
        # eagerly where that is the faster one (`rows_eagerly`); calibration (an observer) stays
        # on this path, whose recorder sees the channels-major h.
        if self.kernel.rows:
            return self.forward_rows(x).view(*lead, self.out_features)
        if self.backend is Backend.DENSE and self.observer is None:
            shared = self.inputs_shared
            rows = rows_eagerly(self.weight.dtype, x.shape[0], self.in_features, shared)
            if torch.compiler.is_compiling() or rows:
                return self.forward_rows(x).view(*lead, self.out_features)
        h = self._transform(x)
        if self.observer is not None:
            self.observer(self, h.t())
        scale = None
        if self.act_mode == ACT_DYNAMIC:
            # Per-token: the token's scale factors out of the matmul and is applied after it,
            # by the integer kernels; the dense ones take h scaled back (`_fake_quant`).
            h, scale = self._quant_tokens(h, *_token_min_max(h))
            if self.backend is Backend.DENSE:
                h, scale = _fake_quant(h, scale), None
        elif self.act_mode == ACT_STATIC:
            qmax = (1 << (self.a_bits - 1)) - 1
            s = self.act_scale.view(-1, 1)
            h = torch.div(h, s).round_().clamp_(-qmax - 1, qmax).mul_(s)
        y = self.kernel.linear_t(self, h)
        # int8 returns its input's dtype; dense and int4 their matmul's (the model's dtype, or
        # autocast's).
        out_dtype = in_dtype if self.backend is Backend.INT8 else y.dtype
        # Before the restore: the token scale commutes with it, and the bias is stored rotated
        # back, so both take one float32 pass here.
        if scale is not None and self.bias is not None:
            y = torch.addcmul(self.bias.view(-1, 1), y, scale)
        elif scale is not None:
            y = torch.mul(y, scale)
        elif self.bias is not None:
            y = torch.add(y, self.bias.view(-1, 1))
        if self.out is not None:
            y = _restore_rows(y, self.out, self.out_tail, self.out_row_scales, out_dtype)
        else:
            y = contiguous_as(y.t(), out_dtype)
        return y.view(*lead, self.out_features)

    def _transform(self, x: torch.Tensor) -> torch.Tensor:
        """Row-major x [T, in] -> channels-major transformed float32 h [in, T].

        The layout change rides on the first block transform, which reads x transposed in
        place (after a leading permutation as a row-major gather). Other dtypes are cast to
        float32 first: a straight cast costs a fraction of a transposing one (on an EPYC CPU
        50 us against 1.5 ms for a [64, 16384] bfloat16 x).
        """
        in1, perm, in2 = self.in1, self.perm, self.in2
        if in1 is None and in2 is None:
            # A copy even where x^T is already contiguous (one token): h is the layer's to
            # quantize in place.
            h = x.t().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
            return h if perm is None else h.index_select(0, perm)
        x = x.to(torch.float32)
        if in1 is None:
            if perm is not None:
                x = x.index_select(1, perm)
            return _blocks_from_rows(x.contiguous(), in2, self.in2_tail, self.in2_row_scales)
        h = _blocks_from_rows(x.contiguous(), in1, self.in1_tail, self.in1_row_scales)
        if perm is not None:
            h = h.index_select(0, perm)
        return h if in2 is None else _blocks_t(h, in2, self.in2_tail, self.in2_row_scales)

    def _quant_tokens(
        self, h: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h and its per-token (min, max) -> (integer-valued codes centred on 0, per-token scale
        shaped like lo), for either layout.

        The same rounding as `math.quantize.fake_quant_per_token`, in float32.
        """
        eps = 1e-8
        if self.act_asym:
            qmax = (1 << self.a_bits) - 1
            lo, hi = lo.clamp(max=0).mul_(self.act_clip), hi.clamp(min=0).mul_(self.act_clip)
            scale = ((hi - lo) / qmax).clamp_min(eps)
            zero = torch.round(-lo / scale)
            q = torch.div(h, scale).add_(zero).round_().clamp_(0, qmax).sub_(zero)
            return q, scale
        qmax = (1 << (self.a_bits - 1)) - 1
        # max|x| without an |x| temporary (vector_norm(inf) and aminmax are slower on CPU). The
        # min and max stay unchanged (their backward reads them); the small ops after run in place.
        scale = torch.maximum(hi, lo.neg()).mul_(self.act_clip / qmax).clamp_min_(eps)
        # In place where autograd does not need h: one activation-sized allocation fewer, which
        # at hundreds of tokens also spares the page faults of fresh memory.
        q = (torch.div(h, scale) if h.requires_grad else h.div_(scale)).round_()
        # Unclipped, |h / scale| <= qmax already; only a clipped range needs the clamp.
        return (q.clamp_(-qmax - 1, qmax) if self.act_clip < 1.0 else q), scale

    def _row_plan(self, compiling: bool) -> _RowPlan:
        """This layer's `_RowPlan`: cached eagerly; traced afresh under torch.compile, where
        building it costs nothing at run time."""
        plan = None if compiling else self.__dict__.get("_plan")
        if plan is None:
            plan = _RowPlan(
                perm=self.perm,
                in1=_RowBlocks.of(self.in1, self.in1_tail, self.in1_row_scales),
                in2=_RowBlocks.of(self.in2, self.in2_tail, self.in2_row_scales),
                out=_RowBlocks.of(self.out, self.out_tail, self.out_row_scales),
                bias=self.bias,
                act_scale=self.act_scale,
                act_mode=self.act_mode,
                kernel=self.kernel,
                dense=self.backend is Backend.DENSE,
                observer=self.observer,
                prep=None if compiling else self._prep(),
                finish=None if compiling else self._finish(),
                gemv=None if compiling else self._gemv(),
            )
            if not compiling:
                self.__dict__["_plan"] = plan
        return plan

    def _prep_dtype(self) -> torch.dtype | None:
        """What the fused activation path writes for this layer's kernel: uint8 codes for int8
        on oneDNN, the activations scaled back in the weight's dtype for dense; None where it
        does not apply (static, asymmetric or no activation quantization, calibration, float16,
        torch's own integer kernels)."""
        if not self.use_fused or self.act_asym or self.observer is not None:
            return None
        if self.act_mode != ACT_DYNAMIC:
            return None
        if self.backend is Backend.INT8 and self.kernel.rows:
            return torch.uint8
        if self.backend is Backend.DENSE and self.weight.dtype in DTYPES:
            return self.weight.dtype
        return None

    def _prep(self) -> Prep | None:
        """The fused activation path of this layer's eager row-major forward."""
        dtype = self._prep_dtype()
        if dtype is None:
            return None
        blocks = (self.in1, self.in1_tail, self.in1_row_scales)
        blocks += (self.in2, self.in2_tail, self.in2_row_scales)
        return Prep.of(self.in_features, self.perm, *blocks, self.a_bits, self.act_clip, dtype)

    def _finishes(self) -> bool:
        """Whether this layer's int8 tail may run fused: int8 on oneDNN, `use_fused`."""
        return self.use_fused and self.backend is Backend.INT8 and self.kernel.rows

    def _finish(self) -> Finish | None:
        """The fused tail of this layer's eager row-major int8 forward."""
        if not self._finishes():
            return None
        restore = (self.out, self.out_tail, self.out_row_scales)
        return Finish.of(self.out_features, self.bias, *restore)

    def _gemv(self) -> Gemv | None:
        """The int8 matmul at a few tokens, where its C kernel reads this layer's weight (with
        the fused tail, whose float32 input it writes)."""
        return Gemv.of(self.weight, self.weight_scale) if self._finishes() else None

    @property
    def fused(self) -> bool:
        """Whether the eager row-major forward (every oneDNN layer's) runs its activation path
        fused, in `runtime.prep`'s C code, rather than as torch ops (set `use_fused = False`
        to have torch ops run it anyway)."""
        return self._row_plan(False).prep is not None

    def _fuses_compiled(self) -> bool:
        """Whether a compiled graph calls this layer's eager fused forward (`fused_rows`)
        for a plain CPU input: where it runs fused eagerly (int8 with its tail; dense outside
        autocast, whose matmul dtype the layer's own forward picks)."""
        if not prep.AVAILABLE or self._prep_dtype() is None:
            return False
        return self._finishes() or not torch.is_autocast_enabled("cpu")

    def __setattr__(self, name: str, value: object) -> None:
        self.__dict__.pop("_plan", None)  # whatever changed, `_row_plan` gathers it again
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        self.__dict__.pop("_plan", None)
        super().__delattr__(name)

    def register_buffer(self, name: str, tensor: torch.Tensor | None, persistent: bool = True):
        self.__dict__.pop("_plan", None)
        super().register_buffer(name, tensor, persistent)

    def forward_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The forward row-major, x [T, in] -> [T, out]: the same math as `forward`, for
        oneDNN's kernels (`Kernel.rows`) and for torch's dense one compiled, where inductor
        fuses it (gather, block transforms and quantization into one loop; for int8 the restore
        with the scale and cast into another), and eagerly where it is the faster one
        (`rows_eagerly`).
        Row-major, torch's matmul takes either operand order at no cost: compiled,
        `rows_weight_first` picks it; eagerly it is nn.Linear's. Shared block matrices are one
        mm each (`_RowBlocks`)."""
        compiling = torch.compiler.is_compiling()
        plain = x.dtype in DTYPES and not x.requires_grad and x.device.type == "cpu"
        if compiling and plain and self._fuses_compiled():
            return fused_rows(x, self._key)
        p = self._row_plan(compiling)
        if p.prep is not None and plain:
            h, scale = p.prep(x)
        else:
            h, scale = self._quantize_rows(x, p, compiling)
        if p.dense:
            return self._dense_rows(h, p, compiling)
        # int8 on oneDNN: float32 with the weight scale applied. In place where autograd does
        # not need y (it is this forward's own).
        if p.gemv is not None and h.dtype == torch.uint8 and h.shape[0] <= GEMV_ROWS:
            y = p.gemv(h)
        else:
            y = p.kernel.linear_rows(self, h)
        tail = x.dtype in DTYPES and not y.requires_grad and scale is not None
        if p.finish is not None and tail:
            return p.finish(y, scale, x.dtype)
        if scale is not None:
            y = torch.mul(y, scale) if y.requires_grad else y.mul_(scale)
        if p.bias is not None:
            y = torch.add(y, p.bias) if y.requires_grad else y.add_(p.bias)
        if p.out is not None:
            y = p.out(y, compiling)
        return contiguous_as(y, x.dtype)

    def _quantize_rows(
        self, x: torch.Tensor, p: _RowPlan, compiling: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [T, in] -> transformed, quantized h [T, in] and the per-token scale, as torch
        ops (what `Prep` does fused): h scaled back (scale None) for the dense kernels,
        integer-valued for the integer ones."""
        if p.in1 is None and p.perm is not None and not compiling:
            h = _gather_columns(x, p.perm)
        else:
            h = x.to(torch.float32, copy=True)  # quantized in place below: never the caller's x
            if p.in1 is not None:
                h = p.in1(h, compiling)
            if p.perm is not None:
                h = h.index_select(1, p.perm)
        if p.in2 is not None:
            h = p.in2(h, compiling)
        if p.observer is not None:
            p.observer(self, h)
        scale = None
        if p.act_mode == ACT_DYNAMIC:
            h, scale = self._quant_tokens(h, h.amin(1, keepdim=True), h.amax(1, keepdim=True))
            if p.dense:
                h, scale = _fake_quant(h, scale), None
        elif p.act_mode == ACT_STATIC:
            qmax = (1 << (self.a_bits - 1)) - 1
            s = p.act_scale.view(1, -1)
            h = torch.div(h, s).round_().clamp_(-qmax - 1, qmax).mul_(s)
        return h, scale

    def _dense_rows(self, h: torch.Tensor, p: _RowPlan, compiling: bool) -> torch.Tensor:
        """h [T, in] (quantized, scaled back) -> h W^T + bias [T, out] in the matmul's dtype:
        oneDNN's matmul adds the bias itself. Autocast picks the matmul's dtype: torch's mm,
        on the plain weight."""
        if p.kernel.rows and not torch.is_autocast_enabled(h.device.type):
            return p.kernel.linear_rows(self, h, p.bias)
        w = self.plain_weight
        if compiling and rows_weight_first(w.dtype, h.shape[0], self.in_features):
            y = torch.mm(w, h.t().to(w.dtype).contiguous()).t()
        else:
            y = torch.mm(h.to(w.dtype), w.t())
        if p.bias is None:
            return y.contiguous()
        return contiguous_as(torch.add(y.float(), p.bias), y.dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The matmul's float dtype: the dense weight's, int4's scales'; float32 for int8 (whose
        rescale is float32). Derived from the buffers, so `model.to` keeps it right."""
        weights = (
            b
            for f, b in self._buffers.items()
            if b is not None and b.is_floating_point() and f not in FLOAT32_FIELDS
        )
        return next((b.dtype for b in weights), torch.float32)

    def _apply(self, fn, recurse: bool = True):  # nn.Module's signature
        """`model.to(dtype)` casts the weight; the float32 buffers are only moved, from their
        float32 values (a float32 -> bfloat16 -> float32 round trip would lose bits). The
        weight moves in its plain layout, then takes the kernel of its new device and dtype."""
        self.use_kernel(KERNELS[self.backend])
        kept = {f: self._buffers[f] for f in FLOAT32_FIELDS if self._buffers.get(f) is not None}
        self._buffers.update(dict.fromkeys(kept))
        super()._apply(fn, recurse)
        for f, t in kept.items():
            moved = fn(t)
            self._buffers[f] = moved if moved.dtype == t.dtype else t.to(moved.device)
        if self.weight is not None:
            self.use_kernel(kernel_for(self.backend, self.weight.device, self.compute_dtype))
        self.__dict__.pop("_plan", None)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        """The weight in its plain layout: a state dict loads anywhere, and pickles."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight is not None:
            destination[prefix + "weight"] = self.plain_weight

    def __getstate__(self) -> dict:
        """Pickling and deepcopy see the plain weight (a prepacked tensor has no storage)."""
        state = self.__dict__.copy()
        state.pop("_plan", None)  # holds the prepacked weight; gathered again on use
        if self.weight is not None:
            state["_buffers"] = self._buffers | {"weight": self.plain_weight}
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._key = _register(self)  # a copy is a layer of its own
        if self.weight is not None:
            self._buffers["weight"] = self.kernel.pack(self.weight)

    def check_static_ok(self) -> None:
        """Static per-channel activation scales do not factor out of an integer matmul."""
        if self.backend is not Backend.DENSE:
            raise ConfigError(
                f"{self.name}: static activation scales need the dense backend, this layer runs "
                f"{self.backend.value} (load with backend='dense' to calibrate)"
            )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, *args) -> None:
        """A state dict holding calibrated scales loads into a layer that has none yet. One saved
        by format 2 has its input blocks transposed back, one by a dense layer of format 2 or 3
        its restore folded into the weight; an earlier one (other meaning of `out` and `bias`)
        is refused, not misread. (load_state_dict hands each module its own copy of the dict.)"""
        version = local_metadata.get("version")
        if version == 2:  # input blocks stored as R^T
            for f in ("in1", "in1_tail", "in2", "in2_tail"):
                if prefix + f in state_dict:
                    state_dict[prefix + f] = state_dict[prefix + f].mT
        elif version is not None and version < 2:
            args[-1].append(  # error_msgs: load_state_dict raises with every module's
                f"{prefix}: state dict of DuQuant layer format {version}, this is "
                f"{self._version} (the restore blocks and bias are stored differently): load "
                f"the pack with load_packed again instead"
            )
            return
        if self.backend is Backend.DENSE and prefix + "out" in state_dict:
            _fold_saved_restore(state_dict, prefix)
        scale = state_dict.get(prefix + "act_scale")
        if scale is not None and self.act_scale is None and self.a_bits < 16:
            self.check_static_ok()
            dev = self.weight.device
            self.act_scale = scale.new_empty(scale.shape, device=dev, dtype=torch.float32)
            self.act_mode, self.calibrated = ACT_STATIC, True
        kernel = self.kernel  # loaded into the plain layout, then packed again
        self.use_kernel(KERNELS[self.backend])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, *args)
        self.use_kernel(kernel)
        self.note_shared()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"w{self.w_bits}a{self.a_bits}, backend={self.backend.value}, act={self.act_mode}, "
            f"row_rot={self.row_rot}"
        )
