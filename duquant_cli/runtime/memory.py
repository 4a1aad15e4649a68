"""How many bytes a DuQuant layer holds at run time, per backend and compute dtype.

Torch-free on purpose: `duquant inspect` answers from the manifest alone and must not pay torch's
start-up time. A test loads packs and checks these numbers against what `status(model)` counts
in the live layers' buffers, so the prediction cannot drift from the runtime.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from math import prod

from duquant_cli.formats.manifest import ITEMSIZE
from duquant_cli.runtime.support import int4_group

DTYPE_BYTES = ITEMSIZE  # bytes per element, by dtype name
# What `inspect` reports: bytes per requested backend (on cpu, where the integer kernels run;
# a layer a kernel cannot run falls back to dense, as load_packed does) and compute dtype.
RUNTIME_BACKENDS = ("dense", "int8", "int4", "auto")
RUNTIME_DTYPES = ("float32", "bfloat16")
_IN_BLOCKS = ("in1", "in1_tail", "in2", "in2_tail")
_OUT_BLOCKS = ("out", "out_tail")


def row_scaled(rotation: str) -> tuple[str, ...]:
    """The block fields a layer also holds as row scales (`math.blocks.block_row_scales`, a
    float32 per channel of their full blocks, where there are two or more): Hadamard stacks
    (one matrix, random signs per block), greedy ones (one matrix), the Hadamard row rotations
    of greedy packs, and a calibrated in1 (smoothing times one of those, or alone). SVD bases
    are not one matrix."""
    if rotation in ("hadamard", "greedy"):
        return ("in1", "in2", "out")
    return ("in1",) if rotation == "none" else ()


def layer_bytes(
    out_features: int,
    in_features: int,
    fields: Mapping[str, Sequence[int]],
    *,
    a_bits: int,
    row_rot: str,
    has_bias: bool,
    dtype: str,
    backend: str = "dense",
    rotation: str = "none",
) -> int:
    """Bytes `DuQuantLinear.from_pack` holds for `backend` in compute `dtype`.

    `fields` maps the pack's tensor fields to their shapes. Mirrors from_pack and the kernels:
    dense dequantizes the weight once to [out, in] in `dtype`; int8 keeps int8 codes and float32
    per-channel scales; int4 keeps torch's packed layout (half a byte a weight) and a scale and
    zero per kernel group in `dtype`. Transforms, bias and static scales are float32 in every
    dtype; the permutation is int64; output blocks are kept only where rows are restored by
    an integer backend (dense folds the restore into its weight).
    `rotation` (the manifest's) says which block stacks also keep row scales (`row_scaled`).
    """
    size = DTYPE_BYTES[dtype]
    fsize = DTYPE_BYTES["float32"]  # transforms, bias and static scales (see from_pack)
    if backend == "dense":
        n = out_features * in_features * size
    elif backend == "int8":
        n = out_features * in_features + out_features * DTYPE_BYTES["float32"]
    elif backend == "int4":
        groups = fields["scale"][1]
        g = int4_group(in_features, in_features // groups)
        if g is None:
            raise ValueError(f"no int4 kernel group for {in_features} inputs in {groups} groups")
        n = out_features * in_features // 2 + (in_features // g) * out_features * 2 * size
    else:
        raise ValueError(f"unknown backend {backend!r}")
    restored = row_rot == "restore" and backend != "dense"
    blocks = _IN_BLOCKS + (_OUT_BLOCKS if restored else ())
    n += sum(prod(fields[f]) * fsize for f in blocks if f in fields)
    scaled = [f for f in row_scaled(rotation) if f in blocks and f in fields]
    n += sum(prod(fields[f][:2]) * fsize for f in scaled if fields[f][0] > 1)
    if "perm" in fields:
        n += in_features * DTYPE_BYTES["int64"]
    if has_bias:
        n += out_features * fsize
    if "act_scale" in fields and a_bits < 16:
        n += in_features * fsize
    return n
