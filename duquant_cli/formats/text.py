"""Reading the plain-text files used for calibration and perplexity."""

from __future__ import annotations

from pathlib import Path

from duquant_cli.errors import ConfigError


def read_text(path: str | Path) -> str:
    """A text file's contents: UTF-8, falling back to Latin-1 (which decodes any bytes)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such text file")
    raw = path.read_bytes()
    if not raw.strip():
        raise ConfigError(f"{path}: the text file is empty")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")
