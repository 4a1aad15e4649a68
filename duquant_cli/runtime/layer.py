"""`DuQuantLinear`: an nn.Linear replacement serving a packed layer from cached buffers.

The forward is the math of `duquant_cli.math.layer_pack`'s docstring, with every transform
prepared once at load time: one gather and one batched block matmul per transform, activation
quantization, the matmul, the row restore (or not), the bias. No Python branching on tensor
values, so `torch.compile(fullgraph=True)` traces it whole.
"""

from __future__ import annotations

import torch
from torch import nn

from duquant_cli.errors import ConfigError, MismatchError
from duquant_cli.formats.pack import LayerEntry
from duquant_cli.math.bitpack import packed_cols
from duquant_cli.math.permutation import is_permutation
from duquant_cli.runtime.backends import KERNELS, Backend, choose_backend

_BLOCK_FIELDS = ("in1", "in1_tail", "in2", "in2_tail", "out", "out_tail")
FIELDS = ("perm", *_BLOCK_FIELDS, "weight", "qweight", "scale", "zero", "bias", "act_scale")
_FLOATS = ("float32", "float16", "bfloat16")
ACT_DYNAMIC, ACT_STATIC, ACT_NONE = "dynamic", "static", "none"
# Floor of static activation scales: float16's smallest normal, so a scale calibrated in float32
# never becomes 0 (and x / 0 never NaN) when the model is later cast to float16.
ACT_SCALE_MIN = 2.0**-14


def _blocks_t(h: torch.Tensor, blocks_t: torch.Tensor, tail_t: torch.Tensor | None) -> torch.Tensor:
    """Channels-major x @ blockdiag(R, tail): h = x^T [n, T] -> [n, T], given the blocks already
    transposed (R^T): one batched matmul (plus one mm for a tail block) writing its output in
    place, with no transpose copy."""
    t = h.shape[1]
    nb, b, _ = blocks_t.shape
    head = nb * b
    y = torch.bmm(blocks_t, h[:head].view(nb, b, t)).view(head, t)
    return y if tail_t is None else torch.cat([y, torch.mm(tail_t, h[head:])], dim=0)


def _contiguous_as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t, contiguous and in `dtype`, in one copy (`Tensor.to` ignores `memory_format` when the
    dtype already matches and would hand back the transposed view)."""
    if t.dtype == dtype:
        return t.contiguous()
    return t.to(dtype, memory_format=torch.contiguous_format)


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


class DuQuantLinear(nn.Module):
    """A linear layer whose input is transformed, quantized, and multiplied by a pre-quantized,
    pre-transformed weight, then restored.

    Buffers (None when the pack has no such transform), all on one device:
        perm: int64 [in]; in1, in2: [n_blocks, B, B], in1_tail, in2_tail: [t, t];
        out: [n_row_blocks, Bo, Bo], out_tail (restore mode only): the pack's blocks, each
        transposed (R^T) since the forward works channels-major (x^T, [in, T]);
        weight: [out, in] (dense backend); bias: [out] (rotated in propagate mode);
        act_scale: [in] static per-channel activation scales, in the transformed basis.
    Floating buffers are in the compute dtype; `model.to(...)` moves and casts them, and
    `state_dict()` holds them all (a calibrated `act_scale` loads back into a fresh layer).

    In propagate mode (`output_rotated`) the output is y R^T with R the pack's `out` blocks:
    only a consumer that absorbs R makes the model exact.
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
        for f in ("perm", *_BLOCK_FIELDS, "weight", "bias", "act_scale"):
            self.register_buffer(f, None)

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
        layer.backend, layer.kernel, layer.backend_reason = backend, KERNELS[backend], reason

        # int8 runs the transforms and quantization in float32 (its matmul is in integers anyway,
        # and float32 ops are the fast ones on CPU); dense and int4 in the compute dtype.
        fdtype = torch.float32 if backend is Backend.INT8 else dtype

        def put(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=fdtype if t.is_floating_point() else t.dtype)

        if "perm" in tensors:
            layer.perm = tensors["perm"].to(device=device, dtype=torch.int64)
        keep = ("in1", "in2") + (("out",) if row_rot == "restore" else ())
        for f in keep:  # stored transposed, as the channels-major forward applies them
            if f in tensors:
                setattr(layer, f, put(tensors[f]).mT.contiguous())
                if f + "_tail" in tensors:
                    setattr(layer, f + "_tail", put(tensors[f + "_tail"]).mT.contiguous())
        layer.output_rotated = row_rot == "propagate" and "out" in tensors
        for f, t in layer.kernel.prepare(entry, tensors, device, dtype).items():
            layer.register_buffer(f, t)
        b = tensors.get("bias", bias)
        if b is not None:
            layer.bias = put(b.detach())
        if "act_scale" in tensors and layer.a_bits < 16:
            layer.act_scale = put(tensors["act_scale"].float().clamp_min(ACT_SCALE_MIN))
            layer.act_mode, layer.calibrated = ACT_STATIC, True
            layer.act_percentile = q.get("act_percentile")
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channels-major inside: one transpose in, one out. Block matmuls, the gather (a row
        # gather of whole tokens' channels) and the matmul then need no other layout copy.
        lead = x.shape[:-1]
        h = _contiguous_as(x.reshape(-1, self.in_features).t(), self.compute_dtype)
        if self.in1 is not None:
            h = _blocks_t(h, self.in1, self.in1_tail)
        if self.perm is not None:
            h = h.index_select(0, self.perm)
        if self.in2 is not None:
            h = _blocks_t(h, self.in2, self.in2_tail)
        if self.observer is not None:
            self.observer(self, h.t())
        if self.act_mode == ACT_DYNAMIC:
            # Per-token: the token's scale factors out of the matmul and is applied after it.
            q, scale = self._quant_tokens(h)
            y = self.kernel.linear_t(self, q).mul_(scale)
        elif self.act_mode == ACT_STATIC:
            qmax = (1 << (self.a_bits - 1)) - 1
            s = self.act_scale.view(-1, 1)
            y = self.kernel.linear_t(self, torch.div(h, s).round_().clamp_(-qmax - 1, qmax).mul_(s))
        else:
            y = self.kernel.linear_t(self, h)
        if self.out is not None:
            y = _blocks_t(y, self.out, self.out_tail)
        if self.bias is not None:
            y = y.add_(self.bias.view(-1, 1))
        # int8 computes in float32 and returns the input's dtype; dense and int4 return their
        # matmul's (the model's dtype, or autocast's).
        out_dtype = x.dtype if self.backend is Backend.INT8 else y.dtype
        return _contiguous_as(y.t(), out_dtype).view(*lead, self.out_features)

    def _quant_tokens(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [in, T] -> (integer-valued codes centred on 0, per-token scale [1, T]).

        The same rounding as `math.quantize.fake_quant_per_token`; the scale's floor 1e-8 is
        raised to float16's smallest normal in float16, where 1e-8 is 0 (and 0 / 0 NaN).
        """
        eps = max(1e-8, torch.finfo(h.dtype).tiny)
        if self.act_asym:
            qmax = (1 << self.a_bits) - 1
            lo = h.amin(0, keepdim=True).clamp(max=0) * self.act_clip
            hi = h.amax(0, keepdim=True).clamp(min=0) * self.act_clip
            scale = ((hi - lo) / qmax).clamp_min(eps)
            zero = torch.round(-lo / scale)
            q = torch.div(h, scale).add_(zero).round_().clamp_(0, qmax).sub_(zero)
            return q, scale
        qmax = (1 << (self.a_bits - 1)) - 1
        # max|x| without an |x| temporary (vector_norm(inf) and aminmax are slower on CPU)
        amax = torch.maximum(h.amax(0, keepdim=True), -h.amin(0, keepdim=True))
        scale = (amax * (self.act_clip / qmax)).clamp_min(eps)
        q = torch.div(h, scale).round_()
        # Unclipped, |h / scale| <= qmax already; only a clipped range needs the clamp.
        return (q.clamp_(-qmax - 1, qmax) if self.act_clip < 1.0 else q), scale

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the transforms and activation quantization run in: the floating buffers'
        (`model.to` casts them). int8 holds float32 transforms whatever the model's dtype; the layer
        returns its input's dtype."""
        return next(b.dtype for b in self.buffers(recurse=False) if b.is_floating_point())

    def check_static_ok(self) -> None:
        """Static per-channel activation scales do not factor out of an integer matmul."""
        if self.backend is not Backend.DENSE:
            raise ConfigError(
                f"{self.name}: static activation scales need the dense backend, this layer runs "
                f"{self.backend.value} (load with backend='dense' to calibrate)"
            )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, *args) -> None:
        """A state dict holding calibrated scales loads into a layer that has none yet."""
        scale = state_dict.get(prefix + "act_scale")
        if scale is not None and self.act_scale is None and self.a_bits < 16:
            self.check_static_ok()
            dev = self.weight.device
            self.act_scale = scale.new_empty(scale.shape, device=dev, dtype=self.compute_dtype)
            self.act_mode, self.calibrated = ACT_STATIC, True
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, *args)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"w{self.w_bits}a{self.a_bits}, backend={self.backend.value}, act={self.act_mode}, "
            f"row_rot={self.row_rot}"
        )
