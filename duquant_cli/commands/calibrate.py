"""`calibrate`: a Hugging Face causal LM and a text file -> calibration statistics."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from duquant_cli.errors import ConfigError
from duquant_cli.formats.hf_models import load_causal_lm, token_windows
from duquant_cli.formats.stats import Stats
from duquant_cli.formats.text import read_text
from duquant_cli.presets import get_preset
from duquant_cli.runtime.collect import collect_stats

Progress = Callable[[int, int], None]  # (windows done, windows in all)

CALIB_WINDOWS = 8  # 4096 tokens: error-compensating rounding needs a few thousand rows
CALIB_LENGTH = 512


@dataclass
class CalibrateSummary:
    """What a calibration run wrote."""

    out: Path
    model: Path
    text: Path
    windows: int
    length: int
    offset: int
    layers: int
    rows: int
    bytes: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return self.__dict__ | {
            "out": str(self.out),
            "model": str(self.model),
            "text": str(self.text),
        }


def lm_batches(windows: torch.Tensor) -> Iterator[dict[str, Any]]:
    """One causal-LM call per window: `model(input_ids=[1, length], use_cache=False)`."""
    for w in windows:
        yield {"input_ids": w[None], "use_cache": False}


def calibrate_lm(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    max_rows: int = 4096,
    select: Callable[[str], bool] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Stats:
    """Statistics of a loaded Hugging Face causal LM over token windows [n, length].

    Runs the decoder alone (`model.<base_model_prefix>`): the output head, half the FLOPs of a
    small LM, is not quantized by default and its logits are not needed. Layers keep the names
    they have in the full model, which are its checkpoint's keys; `select(name)` picks some.
    """
    prefix_name = getattr(model, "base_model_prefix", "")
    body = getattr(model, prefix_name, model) if prefix_name else model
    prefix = f"{prefix_name}." if body is not model else ""
    layers = None
    if select is not None:
        linears = [n for n, m in body.named_modules() if isinstance(m, nn.Linear)]
        layers = [n for n in linears if select(prefix + n)]
        if not layers:
            raise ConfigError(f"no linear layer of {type(model).__name__} is selected")
    raw = collect_stats(body, lm_batches(windows), layers, max_rows=max_rows, progress=progress)
    return Stats({prefix + k: v for k, v in raw.layers.items()}, raw.meta)


def calibrate(
    model_dir: str | Path,
    text: str | Path,
    out: str | Path,
    *,
    windows: int = CALIB_WINDOWS,
    length: int = CALIB_LENGTH,
    offset: int = 0,
    max_rows: int = 4096,
    preset: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> CalibrateSummary:
    """Run `windows` windows of `length` tokens of `text` through the model and save statistics.

    Args:
        model_dir: a local Hugging Face causal-LM folder (needs the `hf` extra).
        text: a plain-text file; windows `offset .. offset + windows - 1` of it are used.
        out: the statistics file to write (safetensors).
        max_rows: rows kept per layer (a uniform sample of all tokens).
        preset: only the layers this preset quantizes (see `duquant presets`).
        force: replace an existing `out`.
        progress: called after each window.

    Returns:
        A CalibrateSummary.

    Example:
        >>> calibrate("smollm2-135m", "train.txt", "stats.safetensors")  # doctest: +SKIP
    """
    out, model_dir, text = Path(out), Path(model_dir), Path(text)
    if out.exists() and not force:
        raise ConfigError(f"{out}: already exists (use --force to replace it)")
    start = time.perf_counter()
    content = read_text(text)
    model, tokenizer = load_causal_lm(model_dir)
    ids = token_windows(tokenizer, content, windows, length, offset)

    def tick(done: int) -> None:
        if progress:
            progress(done, windows)

    select = get_preset(preset).matches if preset is not None else None
    raw = calibrate_lm(model, ids, max_rows=max_rows, select=select, progress=tick)
    source = {"model": str(model_dir), "text": str(text), "windows": windows, "length": length}
    stats = Stats(raw.layers, raw.meta | {"source": source | {"offset": offset}})
    stats.save(out)
    rows = max(s.rows.shape[0] for s in stats.layers.values())
    return CalibrateSummary(
        out,
        model_dir,
        text,
        windows,
        length,
        offset,
        len(stats.layers),
        rows,
        out.stat().st_size,
        time.perf_counter() - start,
    )
