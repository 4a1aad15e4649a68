"""`evaluate`: perplexity of a Hugging Face causal LM, floating point and packed, on one text."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from duquant_cli.formats.hf_models import load_causal_lm, perplexity, token_windows
from duquant_cli.formats.text import read_text
from duquant_cli.runtime.loader import load_packed

Progress = Callable[[str], None]  # called with the label about to be evaluated

EVAL_WINDOWS = 8
EVAL_LENGTH = 512


@dataclass
class EvalRow:
    """One model variant: its label, the pack it loaded (None: floating point), perplexity."""

    label: str
    pack: str | None
    ppl: float
    seconds: float
    layers: int = 0

    def vs(self, base: float) -> float:
        """Relative perplexity increase over `base`."""
        return self.ppl / base - 1.0


@dataclass
class EvalResult:
    """Perplexities on the same token windows; rows[0] is the floating-point model."""

    text: str
    windows: int
    length: int
    offset: int
    rows: list[EvalRow] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return self.windows * (self.length - 1)

    def to_json(self) -> dict[str, Any]:
        base = self.rows[0].ppl if self.rows else None
        return {
            "text": self.text,
            "windows": self.windows,
            "length": self.length,
            "offset": self.offset,
            "tokens_scored": self.tokens,
            "rows": [r.__dict__ | {"vs_fp": r.vs(base) if base else None} for r in self.rows],
        }


def evaluate_model(
    model: nn.Module,
    windows: torch.Tensor,
    packs: Sequence[tuple[str, str | Path]] = (),
    *,
    fp_label: str = "fp32",
    progress: Progress | None = None,
) -> list[EvalRow]:
    """Perplexity of `model` and of a fresh copy of it with each `(label, pack)` loaded.

    The model itself is never modified.
    """
    rows = []
    if progress:
        progress(fp_label)
    t0 = time.perf_counter()
    rows.append(EvalRow(fp_label, None, perplexity(model, windows), time.perf_counter() - t0))
    for label, pack_dir in packs:
        if progress:
            progress(label)
        t0 = time.perf_counter()
        packed = copy.deepcopy(model)
        report = load_packed(packed, pack_dir)
        ppl = perplexity(packed, windows)
        rows.append(
            EvalRow(label, str(pack_dir), ppl, time.perf_counter() - t0, len(report.replaced))
        )
        del packed
    return rows


def evaluate(
    model_dir: str | Path,
    text: str | Path,
    packs: Sequence[str | Path] = (),
    *,
    windows: int = EVAL_WINDOWS,
    length: int = EVAL_LENGTH,
    offset: int = 0,
    progress: Progress | None = None,
) -> EvalResult:
    """Perplexity over `windows` consecutive windows of `length` tokens of a text file, from
    window `offset`, for the floating-point model and each pack.

    Args:
        model_dir: a local Hugging Face causal-LM folder (needs the `hf` extra).
        text: a plain-text file.
        packs: pack folders made from this model's checkpoint.

    Returns:
        An EvalResult with one row for the model and one per pack.

    Example:
        >>> evaluate("smollm2-135m", "test.txt", ["packs/smollm2-w4a8"])  # doctest: +SKIP
    """
    content = read_text(text)
    model, tokenizer = load_causal_lm(Path(model_dir))
    ids = token_windows(tokenizer, content, windows, length, offset)
    labelled = [(Path(p).name, p) for p in packs]
    rows = evaluate_model(model, ids, labelled, progress=progress)
    return EvalResult(str(text), windows, length, offset, rows)
