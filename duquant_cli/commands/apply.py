"""`apply`: build every packed layer and compare it with its checkpoint layer, without model code.

Each DuQuant layer is built from the pack (`DuQuantLinear.from_pack`), each reference from the
checkpoint's weight and bias, and both run on the same inputs: seeded Gaussian rows, or the
calibration rows of a statistics file. Errors are measured against the float32 reference
layer; times against `nn.Linear` in the compute dtype.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from duquant_cli.commands.stale import check_source
from duquant_cli.errors import ConfigError, MismatchError
from duquant_cli.formats.checkpoint import open_checkpoint
from duquant_cli.formats.pack import LayerEntry, Pack
from duquant_cli.formats.stats import Stats
from duquant_cli.math.blocks import apply_blocks
from duquant_cli.math.layer_pack import layer_generator
from duquant_cli.runtime.backends import Backend
from duquant_cli.runtime.layer import DuQuantLinear
from duquant_cli.runtime.loader import module_bytes, usable_device

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
Progress = Callable[[str], None]  # called with each layer name once it is measured


@dataclass
class ApplyRow:
    """One layer: errors of the DuQuant layer against the fp32 checkpoint layer, bytes, times.

    `sqnr_db` is None when the outputs are identical; `compared` is "output", or "rotated
    output" for propagate-mode layers (compared with y R^T, what they are meant to return).
    """

    name: str
    shape: tuple[int, int]
    precision: str
    rel_error: float
    sqnr_db: float | None
    bytes_fp: int
    bytes_dq: int
    t_linear_us: float
    t_dq_us: float
    tokens: int
    compared: str = "output"


@dataclass
class ApplyResult:
    checkpoint: Path
    pack: Path
    device: str
    dtype: str
    inputs: str
    rows: list[ApplyRow] = field(default_factory=list)

    @property
    def worst_rel_error(self) -> float:
        return max((r.rel_error for r in self.rows), default=0.0)

    def to_json(self) -> dict:
        return {
            "checkpoint": str(self.checkpoint),
            "pack": str(self.pack),
            "device": self.device,
            "dtype": self.dtype,
            "inputs": self.inputs,
            "worst_rel_error": self.worst_rel_error,
            "bytes_fp": sum(r.bytes_fp for r in self.rows),
            "bytes_dq": sum(r.bytes_dq for r in self.rows),
            "layers": [asdict(r) | {"shape": list(r.shape)} for r in self.rows],
        }


def source_problems(pack: Pack, checkpoint: str | Path) -> list[str]:
    """Layers whose recorded source weight (or bias) is not in the checkpoint, one line each."""
    check = check_source(pack.path, checkpoint)
    problems = [f"{n}: weight differs from the one packed" for n in check.stale]
    problems += [f"{n}: weight not in the checkpoint" for n in check.missing]
    problems += [f"{n}: the pack records no source hash" for n in check.unrecorded]
    with open_checkpoint(checkpoint) as ckpt:
        keys = set(ckpt.keys())
    for name, entry in pack.layers.items():
        bias = entry.source.get("bias")
        if bias and bias not in keys:
            problems.append(f"{name}: bias {bias!r} not in the checkpoint")
    return problems


def _timer(device: torch.device) -> Callable[[], float]:
    if device.type == "cuda":

        def now() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()

        return now
    return time.perf_counter


def _median_us(fns: dict[str, Callable[[], object]], repeats: int, now) -> dict[str, float]:
    """Median microseconds per call, the functions run in alternation (noise hits all alike)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = now()
            fn()
            times[k].append(now() - t0)
    return {k: statistics.median(v) * 1e6 for k, v in times.items()}


def _inputs(
    entry: LayerEntry, stats: Stats | None, where: str, tokens: int, seed: int
) -> torch.Tensor:
    if stats is not None:
        return stats.require(entry.name, entry.in_features, where).rows.float()
    gen = layer_generator(seed, entry.name)
    return torch.randn(tokens, entry.in_features, generator=gen)


def _rotate_rows(y: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """y R^T for the pack's `out` blocks: what a propagate-mode layer returns."""
    tail = tensors.get("out_tail")
    return apply_blocks(y, tensors["out"].mT.to(y), None if tail is None else tail.mT.to(y))


def _measure(
    entry: LayerEntry,
    tensors: dict[str, torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    x32: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
) -> ApplyRow:
    dq = DuQuantLinear.from_pack(
        entry, tensors, bias=bias, device=device, dtype=dtype, backend=Backend.DENSE
    )
    lin = nn.Linear(entry.in_features, entry.out_features, bias=bias is not None)
    lin = lin.to(device=device, dtype=dtype).requires_grad_(False)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    x = x32.to(device=device, dtype=dtype)
    with torch.inference_mode():
        w32 = weight.to(device=device, dtype=torch.float32)
        b32 = None if bias is None else bias.to(device=device, dtype=torch.float32)
        ref = F.linear(x.float(), w32, b32)
        compared = "rotated output" if dq.output_rotated else "output"
        if dq.output_rotated:
            ref = _rotate_rows(ref, {k: v.to(device) for k, v in tensors.items()})
        y = dq(x).double()
        ref = ref.double()
        noise = (y - ref).square().sum().item()
        power = ref.square().sum().item()
        times = _median_us({"linear": lambda: lin(x), "dq": lambda: dq(x)}, repeats, _timer(device))
    return ApplyRow(
        name=entry.name,
        shape=(entry.out_features, entry.in_features),
        precision=str(entry.precision),
        rel_error=math.sqrt(noise / power) if power > 0 else math.sqrt(noise),
        sqnr_db=10 * math.log10(power / noise) if noise > 0 and power > 0 else None,
        bytes_fp=module_bytes(lin),
        bytes_dq=module_bytes(dq),
        t_linear_us=times["linear"],
        t_dq_us=times["dq"],
        tokens=x.shape[0],
        compared=compared,
    )


def apply(
    checkpoint: str | Path,
    pack_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    stats: str | Path | None = None,
    tokens: int = 64,
    seed: int = 0,
    repeats: int = 5,
    progress: Progress | None = None,
) -> ApplyResult:
    """Compare every layer of a pack with its checkpoint layer.

    Args:
        checkpoint: the checkpoint the pack was made from.
        pack_dir: the pack.
        device, dtype: where and in which dtype both layers run.
        stats: a statistics file (`NAME.rows` [r, in] per layer) to use as inputs instead of
            `tokens` seeded Gaussian rows per layer.
        tokens, seed: the random inputs (seeded per layer name).
        repeats: timed calls per layer (median).
        progress: called with each layer name once it is measured.

    Returns:
        An ApplyResult, one row per layer in pack order.

    Raises:
        MismatchError: the pack was not made from this checkpoint (names every such layer).

    Example:
        >>> apply("model.safetensors", "packs/model-w4a8-b16").worst_rel_error  # doctest: +SKIP
        0.083
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    dev = usable_device(device)
    if tokens < 1 or repeats < 1:
        raise ConfigError(f"tokens and repeats must be at least 1, got {tokens} and {repeats}")
    pack = Pack.open(pack_dir)
    st = Stats.load(stats) if stats is not None else None
    inputs = f"rows of {stats}" if st is not None else f"{tokens} Gaussian rows (seed {seed})"
    result = ApplyResult(
        Path(checkpoint), pack.path, str(dev), str(dtype).removeprefix("torch."), inputs
    )
    problems = source_problems(pack, checkpoint)
    if problems:
        more = f"; and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise MismatchError(
            f"{pack.path} was not made from {checkpoint}: {len(problems)} layer(s): "
            + "; ".join(problems[:8])
            + more
        )
    with open_checkpoint(checkpoint) as ckpt:
        for name, entry in pack.layers.items():
            x32 = _inputs(entry, st, str(stats), tokens, seed)
            weight = ckpt.tensor(entry.source["key"])
            bkey = entry.source.get("bias")
            bias = ckpt.tensor(bkey) if bkey else None
            row = _measure(entry, pack.load(name), weight, bias, x32, dev, dtype, repeats)
            result.rows.append(row)
            if progress:
                progress(name)
    return result
