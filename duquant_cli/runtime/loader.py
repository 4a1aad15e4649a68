"""`load_packed`: swap a model's nn.Linear layers for DuQuant layers served from a pack."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from duquant_cli.errors import MismatchError
from duquant_cli.formats.checkpoint import tensor_sha256
from duquant_cli.formats.pack import DTYPES, LayerEntry, Pack
from duquant_cli.runtime.backends import Backend, choose_backend
from duquant_cli.runtime.layer import DuQuantLinear

Prefix = str | tuple[str, str]


@dataclass
class LoadReport:
    """What `load_packed` did: replaced layers, skipped ones with reasons, bytes held."""

    replaced: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0


def module_name(pack_name: str, prefix: Prefix) -> str:
    """A string prefix is prepended to pack names; (old, new) replaces a leading `old`."""
    if isinstance(prefix, tuple):
        old, new = prefix
        return new + pack_name[len(old) :] if pack_name.startswith(old) else pack_name
    return prefix + pack_name


def _module_bytes(m: nn.Module) -> int:
    tensors = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
    return sum(t.numel() * t.element_size() for t in tensors)


def _check(entry: LayerEntry, name: str, mod: nn.Module | None) -> str | None:
    if mod is None:
        return f"{name}: no such module in the model"
    if not isinstance(mod, nn.Linear):
        return f"{name}: is {type(mod).__name__}, not nn.Linear"
    if (mod.out_features, mod.in_features) != (entry.out_features, entry.in_features):
        return (
            f"{name}: model has {mod.out_features}x{mod.in_features}, "
            f"pack has {entry.out_features}x{entry.in_features}"
        )
    if mod.weight.device.type == "meta":
        return f"{name}: weight is on the meta device"
    return None


def _stale(entry: LayerEntry, mod: nn.Linear) -> bool:
    recorded = entry.source.get("sha256")
    dtype = DTYPES.get(entry.source.get("dtype", ""), mod.weight.dtype)
    return recorded != tensor_sha256(mod.weight.detach().to(dtype))


def load_packed(
    model: nn.Module,
    pack_dir: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    backend: str | Backend = "auto",
    strict: bool = True,
    prefix: Prefix = "",
    verify_source: bool = False,
) -> LoadReport:
    """Replace each packed `nn.Linear` of `model` with a `DuQuantLinear`.

    Everything is checked before anything changes: on any error the model is untouched.

    Args:
        model: the model; layers are matched by module name.
        pack_dir: a pack folder written by `duquant pack`.
        device, dtype: where and in which compute dtype the layers run (default: the
            replaced layer's own).
        backend: "auto" or "dense" (see `Backend`).
        strict: a pack layer with no matching module is an error (else skipped and reported).
        prefix: maps pack names to module names (see `module_name`).
        verify_source: refuse the pack if the model's weights differ from those it was made from.

    Returns:
        A LoadReport.

    Example:
        >>> report = load_packed(model, "packs/model-w4a8-b16")  # doctest: +SKIP
    """
    pack = Pack.open(pack_dir)
    backend = Backend(backend)
    modules = dict(model.named_modules())
    report = LoadReport()
    problems: list[str] = []
    chosen: list[tuple[LayerEntry, str, nn.Linear]] = []
    for entry in pack.layers.values():
        name = module_name(entry.name, prefix)
        problem = _check(entry, name, modules.get(name))
        if problem and not strict and modules.get(name) is None:
            report.skipped.append((entry.name, problem))
        elif problem:
            problems.append(problem)
        else:
            chosen.append((entry, name, modules[name]))
    if problems:
        raise MismatchError(_summarize("pack does not fit the model", problems))
    if verify_source:
        stale = [name for entry, name, mod in chosen if _stale(entry, mod)]
        if stale:
            raise MismatchError(_summarize("pack was made from other weights (stale)", stale))
    # Read (and so validate) every tensor before the first swap.
    loaded = [pack.load(entry.name) for entry, _, _ in chosen]
    for (entry, name, mod), tensors in zip(chosen, loaded, strict=True):
        dev = torch.device(device) if device is not None else mod.weight.device
        dt = dtype or mod.weight.dtype
        be, reason = choose_backend(
            backend, dev, dt, entry.precision.w_bits, entry.precision.a_bits
        )
        bias = mod.bias.detach() if mod.bias is not None else None
        new = DuQuantLinear.from_pack(
            entry, tensors, bias=bias, device=dev, dtype=dt, backend=be, reason=reason
        )
        report.bytes_before += _module_bytes(mod)
        report.bytes_after += _module_bytes(new)
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, new)
        report.replaced.append(name)
    return report


def _summarize(what: str, items: list[str], limit: int = 8) -> str:
    shown = "; ".join(items[:limit])
    more = f"; and {len(items) - limit} more" if len(items) > limit else ""
    return f"{what}: {len(items)} layer(s): {shown}{more}"
