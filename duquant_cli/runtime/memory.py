"""How many bytes a DuQuant layer holds at run time, per backend and compute dtype.

Torch-free on purpose: `duquant inspect` answers from the manifest alone and must not pay torch's
start-up time. A test loads packs and checks these numbers against what `status(model)` counts
in the live layers' buffers, so the prediction cannot drift from the runtime.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from math import prod

DTYPE_BYTES = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "uint8": 1,
    "int8": 1,
}
# Compute dtypes `inspect` reports; int backends will add their own rows when they exist.
RUNTIME_DTYPES = ("float32", "bfloat16")
_IN_BLOCKS = ("in1", "in1_tail", "in2", "in2_tail")
_OUT_BLOCKS = ("out", "out_tail")


def dense_layer_bytes(
    out_features: int,
    in_features: int,
    fields: Mapping[str, Sequence[int]],
    *,
    a_bits: int,
    row_rot: str,
    has_bias: bool,
    dtype: str,
) -> int:
    """Bytes `DuQuantLinear.from_pack` holds on the dense backend in compute `dtype`.

    `fields` maps the pack's tensor fields to their shapes. Mirrors from_pack: the weight is
    dequantized once to [out, in]; transforms, bias and static scales are cast to `dtype`; the
    permutation is int64; output blocks are dropped unless rows are restored.
    """
    size = DTYPE_BYTES[dtype]
    n = out_features * in_features * size
    blocks = _IN_BLOCKS + (_OUT_BLOCKS if row_rot == "restore" else ())
    n += sum(prod(fields[f]) * size for f in blocks if f in fields)
    if "perm" in fields:
        n += in_features * DTYPE_BYTES["int64"]
    if has_bias:
        n += out_features * size
    if "act_scale" in fields and a_bits < 16:
        n += in_features * size
    return n
