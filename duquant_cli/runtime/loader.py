"""`load_packed`: swap a model's nn.Linear layers for DuQuant layers served from a pack."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from duquant_cli.errors import ConfigError, MismatchError
from duquant_cli.formats.checkpoint import tensor_sha256
from duquant_cli.formats.pack import DTYPES, LayerEntry, Pack
from duquant_cli.presets import get_preset
from duquant_cli.runtime.backends import Backend, choose_backend
from duquant_cli.runtime.layer import DuQuantLinear, entry_problems

Prefix = str | tuple[str, str]


@dataclass
class LoadReport:
    """What `load_packed` did: replaced layers (module names), skipped pack layers with the
    reason, and the bytes the replaced layers held before and after."""

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


def module_bytes(m: nn.Module) -> int:
    """Bytes of a module's own parameters and buffers."""
    tensors = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
    return sum(t.numel() * t.element_size() for t in tensors)


def _fit(entry: LayerEntry, name: str, mod: nn.Module | None) -> list[str]:
    """Why the pack entry cannot replace module `name` (empty: it can)."""
    if mod is None:
        return [f"{name}: no such module in the model"]
    if isinstance(mod, DuQuantLinear):
        return [f"{name}: already a DuQuant layer (load_packed ran twice?)"]
    if not isinstance(mod, nn.Linear):
        return [f"{name}: is {type(mod).__name__}, not nn.Linear"]
    if (mod.out_features, mod.in_features) != (entry.out_features, entry.in_features):
        return [
            f"{name}: model has {mod.out_features}x{mod.in_features}, "
            f"pack has {entry.out_features}x{entry.in_features}"
        ]
    if mod.weight.device.type == "meta":
        return [f"{name}: weight is on the meta device; load the model's weights first"]
    problems = entry_problems(entry)
    rotated = entry.transform.get("row_rot") == "propagate" and "out" in entry.tensors
    if rotated and ("bias" in entry.tensors) != (mod.bias is not None):
        has = "has" if mod.bias is not None else "has no"
        problems.append(f"{name}: model {has} bias, unlike the pack's source (propagate mode)")
    return problems


def _stale(entry: LayerEntry, mod: nn.Linear) -> bool:
    """Whether the module's weight, in the source's dtype, hashes differently from the pack's."""
    recorded = entry.source.get("sha256")
    dtype = DTYPES.get(entry.source.get("dtype", ""), mod.weight.dtype)
    return recorded != tensor_sha256(mod.weight.detach().to(dtype))


def usable_device(device: str | torch.device) -> torch.device:
    """`torch.device(device)`, checked to exist here (ConfigError with the reason if not)."""
    try:
        dev = torch.device(device)
        torch.empty(0, device=dev)
    except (RuntimeError, TypeError, AssertionError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"invalid or unavailable device {device!r} ({reason})") from None
    return dev


def _options(
    device: str | torch.device | None, dtype: torch.dtype | None, backend: str | Backend
) -> tuple[torch.device | None, Backend]:
    dev = None if device is None else usable_device(device)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ConfigError(f"dtype must be a floating torch dtype, got {dtype!r}")
    try:
        return dev, Backend(backend)
    except ValueError:
        choices = ", ".join(b.value for b in Backend)
        raise ConfigError(f"unknown backend {backend!r}: choose one of {choices}") from None


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
    preset: str | None = None,
) -> LoadReport:
    """Replace each packed `nn.Linear` of `model` with a `DuQuantLinear`.

    Everything is checked, every tensor read and every new layer built before the first swap:
    on any error the model is untouched. The replaced layers' weights are then released (peak
    memory: the model plus the new layers; load a CPU model with `device="cuda"` to keep the
    GPU peak at the new layers alone).

    Args:
        model: the model; layers are matched by module name.
        pack_dir: a pack folder written by `duquant pack`.
        device, dtype: where and in which compute dtype the layers run (default: the
            replaced layer's own).
        backend: "auto" or "dense" (see `Backend`).
        strict: a pack layer with no matching module is an error (else skipped and reported).
        prefix: maps pack names to module names (see `module_name`): "model." or
            ("old.", "new.").
        verify_source: refuse the pack if the model's weights differ from those it was made from.
        preset: replace only the layers of this preset (see `duquant presets`), matched against
            module names, even if the pack holds more; the others are skipped and reported.

    Returns:
        A LoadReport.

    Raises:
        MismatchError: the pack does not fit the model (every problem listed in one message).
        PackError: the pack is unreadable or newer than this duquant.
        ConfigError: a bad device, dtype or backend.

    Example:
        >>> report = load_packed(model, "packs/model-w4a8-b16")  # doctest: +SKIP
        >>> report.replaced[:1]  # doctest: +SKIP
        ['encoder.layer.0.attention.self.query']
    """
    dev, backend = _options(device, dtype, backend)
    only = None if preset is None else get_preset(preset)
    pack = Pack.open(pack_dir)
    modules = dict(model.named_modules())
    report = LoadReport()
    problems: list[str] = []
    chosen: list[tuple[LayerEntry, str, nn.Linear]] = []
    for entry in pack.layers.values():
        name = module_name(entry.name, prefix)
        if only is not None and not only.matches(name):
            report.skipped.append((entry.name, f"{name}: not a layer of preset {only.name}"))
            continue
        mod = modules.get(name)
        found = _fit(entry, name, mod)
        if mod is None and not strict:
            report.skipped.append((entry.name, found[0]))
        elif found:
            problems += found
        else:
            chosen.append((entry, name, mod))
    if problems:
        raise MismatchError(_summarize(f"{pack.path}: pack does not fit the model", problems))
    if only is not None and len(report.skipped) == len(pack.layers):
        raise MismatchError(
            f"{pack.path}: none of the pack's {len(pack.layers)} layers is in preset {only.name}"
        )
    if verify_source:
        stale = [name for entry, name, mod in chosen if _stale(entry, mod)]
        if stale:
            raise MismatchError(
                _summarize(f"{pack.path}: pack was made from other weights", stale, "stale layer")
            )
    built = []
    for entry, name, mod in chosen:
        tensors = pack.load(entry.name)
        d = dev or mod.weight.device
        dt = dtype or mod.weight.dtype
        be, why = choose_backend(backend, d, dt, entry)
        bias = None if mod.bias is None else mod.bias.detach()
        new = DuQuantLinear.from_pack(
            entry, tensors, bias=bias, device=d, dtype=dt, backend=be, reason=why
        )
        built.append((name, mod, new))
    del chosen
    for name, mod, new in built:
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, new)
        report.replaced.append(name)
        report.bytes_before += module_bytes(mod)
        report.bytes_after += module_bytes(new)
    return report


def _summarize(what: str, items: list[str], noun: str = "problem", limit: int = 8) -> str:
    """One line: what, how many, the first `limit` items."""
    shown = "; ".join(items[:limit])
    more = f"; and {len(items) - limit} more" if len(items) > limit else ""
    return f"{what}: {len(items)} {noun}(s): {shown}{more}"
