"""`collect_stats`: run calibration batches through any model and record each linear layer's input.

Per layer it keeps the per-channel max |x| over every row and a uniform sample of at most
`max_rows` rows (each row gets a random key; the smallest keys stay), so memory is bounded by
`max_rows`, never by the number of batches. Layers called one after the other on the very same
tensor (q/k/v, gate/up) share one sample instead of holding copies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from duquant_cli.errors import ConfigError
from duquant_cli.formats.stats import LayerStats, Stats

FP16_MAX = 6e4  # rows of a layer whose |x| passes this are kept in float32
Progress = Callable[[int], None]  # called with the number of batches done


class _Sample:
    """The kept rows with their keys, as chunks; replaced (never mutated) as batches come.

    Chunks are only joined when the sample overflows `max_rows`, so filling it costs one copy.
    """

    __slots__ = ("keys", "rows")

    def __init__(self, rows: tuple[torch.Tensor, ...], keys: tuple[torch.Tensor, ...]) -> None:
        self.rows, self.keys = rows, keys

    @property
    def count(self) -> int:
        return sum(k.shape[0] for k in self.keys)

    def joined(self) -> torch.Tensor:
        dtype = self.rows[0].dtype
        for r in self.rows:
            dtype = torch.promote_types(dtype, r.dtype)
        return torch.cat([r.to(dtype) for r in self.rows])


class _Recorder:
    """Forward pre-hooks that update every chosen layer's max |x| and row sample."""

    def __init__(self, max_rows: int, seed: int) -> None:
        self.max_rows = max_rows
        self.gen = torch.Generator().manual_seed(seed)
        self.amax: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.samples: dict[str, _Sample | None] = {}
        # The last input seen, its sample before and after: a layer called next on the same
        # tensor object with the same sample before reuses the result (holding `x` keeps its
        # memory from being reused by another tensor, so identity is a sound test).
        self._last: tuple[torch.Tensor, _Sample | None, _Sample] | None = None

    def hook(self, name: str) -> Callable[..., None]:
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs.get("input")
            if isinstance(x, torch.Tensor):
                self.record(name, x)

        return pre_hook

    def record(self, name: str, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1])
        amax = flat.abs().amax(0).float().cpu() if flat.shape[0] else None
        if amax is not None:
            old = self.amax.get(name)
            self.amax[name] = amax if old is None else torch.maximum(old, amax)
        self.tokens[name] = self.tokens.get(name, 0) + flat.shape[0]
        before = self.samples.get(name)
        last = self._last
        if last is not None and last[0] is x and last[1] is before:
            self.samples[name] = last[2]
            return
        after = self._merge(before, flat, float(self.amax[name].max()) if amax is not None else 0.0)
        self.samples[name] = after
        self._last = (x, before, after)

    def _merge(self, old: _Sample | None, flat: torch.Tensor, amax: float) -> _Sample:
        dtype = torch.float16 if amax < FP16_MAX else torch.float32
        keys = torch.rand(flat.shape[0], generator=self.gen)
        if flat.shape[0] > self.max_rows:
            keep = keys.topk(self.max_rows, largest=False).indices
            flat, keys = flat[keep.to(flat.device)], keys[keep]
        new = _Sample((flat.float().cpu().to(dtype),), (keys,))
        if old is None:
            return new
        merged = _Sample(old.rows + new.rows, old.keys + new.keys)
        if merged.count <= self.max_rows:
            return merged
        rows, keys = merged.joined(), torch.cat(merged.keys)
        keep = keys.topk(self.max_rows, largest=False).indices.sort().values
        return _Sample((rows[keep],), (keys[keep],))

    def stats(self, meta: dict[str, Any]) -> Stats:
        layers = {}
        joined: dict[int, torch.Tensor] = {}  # one tensor per shared sample
        for name, sample in self.samples.items():
            if sample is None or name not in self.amax:
                continue
            if id(sample) not in joined:
                joined[id(sample)] = sample.joined()
            layers[name] = LayerStats(self.amax[name], joined[id(sample)], self.tokens[name])
        return Stats(layers, meta)


def _call(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, tuple):
        model(*batch)
    else:
        model(batch)


def _choose(model: nn.Module, layers: Iterable[str] | None) -> dict[str, nn.Linear]:
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if layers is None:
        if not linears:
            raise ConfigError(f"{type(model).__name__} has no nn.Linear layers to calibrate")
        return linears
    chosen = {}
    for name in layers:
        if name not in linears:
            raise ConfigError(f"{name}: no nn.Linear of that name in {type(model).__name__}")
        chosen[name] = linears[name]
    if not chosen:
        raise ConfigError("no layers chosen for calibration")
    return chosen


def collect_stats(
    model: nn.Module,
    batches: Iterable[Any],
    layers: Iterable[str] | None = None,
    max_rows: int = 4096,
    *,
    seed: int = 0,
    progress: Progress | None = None,
) -> Stats:
    """Run `batches` through `model` under `torch.no_grad()` and return each layer's statistics.

    Args:
        model: any nn.Module, in the mode it should be calibrated in (usually `model.eval()`).
        batches: each is called as `model(**batch)` if a dict, `model(*batch)` if a tuple,
            else `model(batch)`; outputs are discarded.
        layers: module names of the nn.Linear layers to watch; default every nn.Linear.
        max_rows: rows kept per layer (a uniform sample of all rows seen).
        seed: seeds the row sampling.
        progress: called after each batch with the number of batches done.

    Returns:
        Stats, keyed by module name; `stats.save(path)` writes it as safetensors.

    Example:
        >>> stats = collect_stats(model, [ids[:1], ids[1:2]], max_rows=1024)  # doctest: +SKIP
        >>> stats.save("stats.safetensors")  # doctest: +SKIP
    """
    if max_rows < 1:
        raise ConfigError(f"max_rows must be at least 1, got {max_rows}")
    chosen = _choose(model, layers)
    rec = _Recorder(max_rows, seed)
    for name in chosen:
        rec.samples[name] = None
    handles = [
        m.register_forward_pre_hook(rec.hook(n), with_kwargs=True) for n, m in chosen.items()
    ]
    done = 0
    try:
        with torch.no_grad():
            for batch in batches:
                _call(model, batch)
                rec._last = None
                done += 1
                if progress:
                    progress(done)
    finally:
        for h in handles:
            h.remove()
    if done == 0:
        raise ConfigError("no calibration batches were given")
    missing = [n for n in chosen if n not in rec.amax]
    if len(missing) == len(chosen):
        raise ConfigError("no chosen layer ran during calibration; check the model and batches")
    return rec.stats({"max_rows": max_rows, "batches": done, "seed": seed})
