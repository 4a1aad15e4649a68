"""`inspect --verify`: re-hash every file of a pack and check every invariant of every layer.

The slow path: it reads every tensor. Failures are collected, never raised one at a time, so a
single run names every broken layer and what is wrong with it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from duquant_cli.commands.inspect import is_smoothed, select
from duquant_cli.formats.pack import DTYPES, LayerEntry, Pack, sha256_file
from duquant_cli.math.bitpack import packed_cols
from duquant_cli.math.blocks import BlockDiag, orthogonality_error
from duquant_cli.math.layer_pack import ORTHO_TOL
from duquant_cli.math.permutation import is_permutation

# A smoothed in1 (diag(1/s) R1, s clamped to [1e-2, 1e4]) has condition number <= 1e6.
MAX_COND = 1e8
CHECKS = (
    "manifest", "file-missing", "file-size", "sha256", "file-unlisted", "file-unreadable",
    "fields", "tensor-missing", "read", "shape", "dtype", "finite", "perm", "orthogonal",
    "invertible", "scale", "codes",
)  # fmt: skip
_FLOAT = ("float32", "float16", "bfloat16")
_CODE_DTYPES = {"qweight": ("uint8",), "zero": ("uint8",), "perm": ("int64", "int32")}


@dataclass(frozen=True)
class Failure:
    """where: the layer, or the file for file checks (then `layer` is None)."""

    where: str
    check: str
    detail: str
    layer: str | None = None

    def __str__(self) -> str:
        return f"{self.where}: {self.check}: {self.detail}"


@dataclass
class VerifyReport:
    files_checked: int = 0
    layers_checked: int = 0
    tensors_read: int = 0
    failures: list[Failure] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def failing_layers(self) -> list[str]:
        return list(dict.fromkeys(f.layer for f in self.failures if f.layer))

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "files_checked": self.files_checked,
            "layers_checked": self.layers_checked,
            "tensors_read": self.tensors_read,
            "failures": [asdict(f) for f in self.failures],
        }


def _names(items: list[str], limit: int = 4) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _check_files(pack: Pack, report: VerifyReport) -> None:
    """Every file the manifest lists: present, of the recorded size and SHA-256."""
    holders: dict[str, list[str]] = {}
    for e in pack.layers.values():
        for file in _files_of(e):
            holders.setdefault(file, []).append(e.name)
    listed: set[str] = set()
    for f in pack.manifest.get("files") or []:
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            report.failures.append(Failure("manifest", "manifest", f"bad 'files' entry {f!r}"))
            continue
        name = f["name"]
        listed.add(name)
        report.files_checked += 1
        path = pack.path / name
        holds = f" (holds layers {_names(holders[name])})" if holders.get(name) else ""
        if not path.is_file():
            report.failures.append(Failure(name, "file-missing", f"listed but absent{holds}"))
            continue
        size = path.stat().st_size
        if f.get("bytes") is not None and size != f["bytes"]:
            detail = f"{size} bytes on disk, manifest says {f['bytes']}{holds}"
            report.failures.append(Failure(name, "file-size", detail))
        if not f.get("sha256"):
            report.failures.append(Failure(name, "sha256", "no checksum recorded"))
        elif sha256_file(path) != f["sha256"]:
            detail = f"contents differ from the recorded checksum{holds}"
            report.failures.append(Failure(name, "sha256", detail))
    for name in sorted(set(holders) - listed):
        detail = f"used by layers {_names(holders[name])} but not in the manifest's files"
        report.failures.append(Failure(name, "file-unlisted", detail))


def expected_shapes(entry: LayerEntry) -> dict[str, tuple[int, ...]]:
    """The shape each tensor field must have, from the layer's features, blocks and groups."""
    out_f, in_f = entry.out_features, entry.in_features
    bits = entry.precision.w_bits
    exp: dict[str, tuple[int, ...]] = {"perm": (in_f,), "bias": (out_f,), "act_scale": (in_f,)}
    if entry.precision.quantize_weight:
        gs = entry.quant.get("group_size") or in_f
        groups = in_f // gs if gs and in_f % gs == 0 else -1
        exp |= {"qweight": (out_f, packed_cols(in_f, bits)), "scale": (out_f, groups)}
        exp["zero"] = (out_f, groups)
    else:
        exp["weight"] = (out_f, in_f)
    sizes = {
        "in1": (in_f, entry.transform.get("block")),
        "in2": (in_f, entry.transform.get("block")),
        "out": (out_f, entry.transform.get("block_out") or entry.transform.get("block")),
    }
    for f, (n, block) in sizes.items():
        if not block:
            continue
        b = min(int(block), n)
        exp[f] = (n // b, b, b)
        if n % b:
            exp[f + "_tail"] = (n % b, n % b)
    return exp


def _check_fields(entry: LayerEntry) -> list[Failure]:
    """Which fields must exist, and every recorded shape and dtype against what it must be."""
    fails = []
    t = entry.tensors

    def fail(check: str, detail: str) -> None:
        fails.append(Failure(entry.name, check, detail, entry.name))

    need = ["qweight", "scale"] if entry.precision.quantize_weight else ["weight"]
    if entry.precision.quantize_weight and entry.quant.get("weight_scheme") == "asym":
        need.append("zero")
    if entry.transform.get("permute"):
        need.append("perm")
    for f in ("in1", "in2", "out"):
        if f + "_tail" in t and f not in t:
            need.append(f)
    if missing := [f for f in need if f not in t]:
        fail("fields", f"manifest lacks {', '.join(missing)} for a {entry.precision} layer")
    exp = expected_shapes(entry)
    for f, ref in t.items():
        if f in exp and ref.shape != exp[f]:
            fail("shape", f"{f} is recorded as {list(ref.shape)}, the layer needs {list(exp[f])}")
        want = _CODE_DTYPES.get(f, _FLOAT if f in exp else None)
        if want and ref.dtype not in want:
            fail("dtype", f"{f} is {ref.dtype}, expected {' or '.join(want)}")
    for f in ("in1", "in2", "out"):
        if f in t and f + "_tail" in exp and f + "_tail" not in t:
            fail("fields", f"{f} needs a {f}_tail block of {list(exp[f + '_tail'])}")
        if f + "_tail" in t and f in exp and f + "_tail" not in exp:
            fail("fields", f"{f}_tail is stored but the dimension is a whole number of blocks")
    gs = entry.quant.get("group_size")
    if entry.precision.quantize_weight and gs and entry.in_features % int(gs):
        fail("shape", f"group_size {gs} does not divide in_features {entry.in_features}")
    return fails


def _load(
    entry: LayerEntry, handles: dict[str, Any], keys: dict[str, set[str]], report: VerifyReport
) -> tuple[dict[str, torch.Tensor], list[Failure]]:
    """The layer's tensors that read back with the recorded shape and dtype; failures for others."""
    got: dict[str, torch.Tensor] = {}
    fails = []
    unreadable = []
    for f, ref in entry.tensors.items():
        file = ref.file or entry.file
        handle = handles.get(file)
        if handle is None:
            unreadable.append(f)
            continue
        if ref.key not in keys[file]:
            detail = f"{f}: key {ref.key!r} is not in {file}"
            fails.append(Failure(entry.name, "tensor-missing", detail, entry.name))
            continue
        try:
            x = handle.get_tensor(ref.key)
        except (SafetensorError, OSError, RuntimeError) as exc:
            detail = f"{f}: cannot read {ref.key!r} from {file} ({exc})"
            fails.append(Failure(entry.name, "read", detail, entry.name))
            continue
        report.tensors_read += 1
        if tuple(x.shape) != ref.shape or x.dtype != DTYPES[ref.dtype]:
            check = "shape" if tuple(x.shape) != ref.shape else "dtype"
            detail = (
                f"{f}: stored {list(x.shape)} {str(x.dtype).removeprefix('torch.')}, manifest says "
                f"{list(ref.shape)} {ref.dtype}"
            )
            fails.append(Failure(entry.name, check, detail, entry.name))
            continue
        got[f] = x
    if unreadable:
        detail = f"{', '.join(unreadable)}: tensor file unreadable"
        fails.append(Failure(entry.name, "read", detail, entry.name))
    return got, fails


def _check_values(entry: LayerEntry, t: dict[str, torch.Tensor]) -> list[Failure]:
    """Permutation, transforms, scales and codes: the invariants the runtime relies on."""
    fails = []

    def fail(check: str, detail: str) -> None:
        fails.append(Failure(entry.name, check, detail, entry.name))

    exp = expected_shapes(entry)
    fits = {f: x for f, x in t.items() if f not in exp or tuple(x.shape) == exp[f]}
    for f, x in fits.items():
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            fail("finite", f"{f} has {int((~torch.isfinite(x)).sum())} non-finite value(s)")
    if "perm" in fits and not is_permutation(fits["perm"], entry.in_features):
        fail("perm", _perm_problem(fits["perm"], entry.in_features))
    smoothed = is_smoothed(entry.transform, t)
    for f in ("in1", "in2", "out"):
        if f not in fits or (f + "_tail" in exp and f + "_tail" not in fits):
            continue
        tail = fits.get(f + "_tail")
        bd = BlockDiag(fits[f].double(), None if tail is None else tail.double())
        if f == "in1" and smoothed:
            cond = _worst_cond(bd)
            if not cond <= MAX_COND:
                fail("invertible", f"smoothed in1 has condition number {cond:.2e} (> {MAX_COND})")
        else:
            err = orthogonality_error(bd)
            if not err < ORTHO_TOL:
                fail("orthogonal", f"{f}: max |RR^T - I| = {err:.2e} (tolerance {ORTHO_TOL})")
    for f in ("scale", "act_scale"):
        if f in fits and not bool((torch.isfinite(fits[f]) & (fits[f] > 0)).all()):
            bad = int((~(torch.isfinite(fits[f]) & (fits[f] > 0))).sum())
            fail("scale", f"{f} has {bad} value(s) that are not finite and positive")
    bits = entry.precision.w_bits
    if "qweight" in fits:
        for detail in _code_problems(fits["qweight"], bits, entry.in_features):
            fail("codes", detail)
    if "zero" in fits and bits < 8 and bool((fits["zero"] >= 1 << bits).any()):
        fail("codes", f"zero has values >= 2^{bits}")
    return fails


def _perm_problem(perm: torch.Tensor, n: int) -> str:
    p = perm.long().reshape(-1)
    if p.numel() != n:
        return f"has {p.numel()} entries, expected {n}"
    if p.numel() and (p.min() < 0 or p.max() >= n):
        return f"index out of range [0, {n})"
    counts = torch.bincount(p, minlength=n)
    dup = int(torch.nonzero(counts > 1)[0])
    return f"not a permutation: index {dup} appears {int(counts[dup])} times"


def _worst_cond(bd: BlockDiag) -> float:
    mats = [bd.blocks] + ([bd.tail[None]] if bd.tail is not None else [])
    worst = 0.0
    for m in mats:
        if not bool(torch.isfinite(m).all()):
            return float("inf")
        s = torch.linalg.svdvals(m)
        worst = max(worst, float((s[..., 0] / s[..., -1]).max()))
    return worst


def _code_problems(q: torch.Tensor, bits: int, in_features: int) -> list[str]:
    """Codes must fit `bits`; at <= 4 bits (two per byte) the odd column's pad nibble is zero."""
    limit = 1 << bits
    out = []
    if bits <= 4:
        lo, hi = q & 0x0F, q >> 4
        bad = int(((lo >= limit) | (hi >= limit)).sum())
        if bad:
            out.append(f"qweight has {bad} byte(s) with a nibble >= 2^{bits}")
        if in_features % 2 and q.shape[1] and bool((hi[:, -1] != 0).any()):
            out.append("qweight's pad nibble (high half of the last byte) is not zero")
    elif bits < 8 and (bad := int((q >= limit).sum())):
        out.append(f"qweight has {bad} code(s) >= 2^{bits}")
    return out


def _files_of(entry: LayerEntry) -> list[str]:
    return list(dict.fromkeys([entry.file] + [r.file for r in entry.tensors.values() if r.file]))


def verify_pack(pack_dir: str | Path, *, layer: str | None = None) -> VerifyReport:
    """Re-hash every file of the pack and check every selected layer; collect all failures.

    Args:
        pack_dir: a pack folder.
        layer: only layers whose name matches this regex (files are always all hashed).

    Returns:
        A VerifyReport; `ok` is False when anything failed, `failures` says what and where.

    Example:
        >>> verify_pack("packs/model-w4a8-b16").ok  # doctest: +SKIP
        True
    """
    pack = Pack.open(pack_dir)
    report = VerifyReport()
    _check_files(pack, report)
    names = select(list(pack.layers), layer)
    handles: dict[str, Any] = {}
    keys: dict[str, set[str]] = {}
    for file in dict.fromkeys(f for n in names for f in _files_of(pack.layers[n])):
        path = pack.path / file
        try:
            handles[file] = safe_open(str(path), framework="pt")
            keys[file] = set(handles[file].keys())
        except (SafetensorError, OSError, ValueError) as exc:
            why = "missing" if not path.exists() else f"not readable ({exc})"
            report.failures.append(Failure(file, "file-unreadable", why))
    for name in names:
        entry = pack.layers[name]
        report.layers_checked += 1
        report.failures += _check_fields(entry)
        tensors, fails = _load(entry, handles, keys, report)
        report.failures += fails
        report.failures += _check_values(entry, tensors)
    return report
