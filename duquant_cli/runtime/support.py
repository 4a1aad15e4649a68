"""Which backend can run a packed layer, decided from its manifest entry alone.

Torch-free, like `memory.py`: `duquant inspect` predicts each backend's bytes without loading
anything, and `load_packed` decides with the same rules, so the two cannot disagree.
"""

from __future__ import annotations

from duquant_cli.formats.manifest import LayerEntry

INT4_GROUPS = (256, 128, 64, 32)  # the group sizes torch's CPU int4 matmul takes
INTEGER_DEVICES = ("cpu",)  # where the integer kernels are tested; elsewhere dense


def int4_group(in_features: int, pack_group: int) -> int | None:
    """The kernel group: the widest of INT4_GROUPS dividing the pack's weight group (so each
    kernel group has one scale) and the input width."""
    return next((g for g in INT4_GROUPS if pack_group % g == 0 and in_features % g == 0), None)


def _groups(entry: LayerEntry) -> int:
    scale = entry.tensors.get("scale")
    return scale.shape[1] if scale is not None else 1


def int8_problem(entry: LayerEntry, device: str) -> str | None:
    """Why the int8 kernel cannot run this layer on `device` (a device type), or None."""
    p, q = entry.precision, entry.quant
    if device not in INTEGER_DEVICES:
        return f"integer kernels are validated on cpu only, not {device}"
    if not p.quantize_weight or not p.quantize_act or p.a_bits > 8:
        return f"{p} has no integer weights and <= 8-bit activations"
    if q.get("weight_scheme", "sym") != "sym":
        return "asymmetric weights"
    if _groups(entry) != 1:
        return "grouped weight scales"
    if q.get("act_scheme", "sym") != "sym":
        return "asymmetric activations"
    if "act_scale" in entry.tensors:
        return "static activation scales"
    return None


def int4_problem(entry: LayerEntry, device: str) -> str | None:
    """Why the int4 kernel cannot run this layer on `device`, or None."""
    p = entry.precision
    if device not in INTEGER_DEVICES:
        return f"integer kernels are validated on cpu only, not {device}"
    if p.w_bits != 4 or p.quantize_act:
        return f"{p} is not weight-only 4-bit (w4a16)"
    n = entry.in_features
    if int4_group(n, n // _groups(entry)) is None:
        return f"no group of {INT4_GROUPS} divides the weight groups of {n} inputs"
    return None


HALF_DTYPES = ("bfloat16", "float16")  # where auto takes int4: its kernel is slow on float32


def choose(requested: str, device: str, entry: LayerEntry, dtype: str) -> tuple[str, str]:
    """(backend, reason) for one layer and compute `dtype` (a name such as "bfloat16"):
    "dense", "int8" or "int4". A requested integer backend that cannot run the layer gives
    dense, with the reason why."""
    if requested == "dense":
        return "dense", "requested"
    problems = {"int4": int4_problem(entry, device), "int8": int8_problem(entry, device)}
    if requested in problems:
        why = problems[requested]
        return (
            (requested, "requested")
            if why is None
            else (
                "dense",
                f"{requested} requested, not possible: {why}",
            )
        )
    if problems["int4"] is None and dtype not in HALF_DTYPES:
        problems["int4"] = f"the int4 kernel is slower than dense on {dtype} activations"
    for be in ("int4", "int8"):
        if problems[be] is None:
            return be, f"auto: {be} kernel fits {entry.precision} on {device}"
    why = "; ".join(f"{be}: {problems[be]}" for be in ("int8", "int4"))
    return "dense", f"auto: dense ({why})"
