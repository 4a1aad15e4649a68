"""`presets`: the preset table as data (see `duquant_cli.presets`)."""

from __future__ import annotations

from typing import Any

from duquant_cli.presets import PRESETS, get_preset


def list_presets(name: str | None = None) -> list[dict[str, Any]]:
    """Every preset (or the one called `name`) as JSON: name, description, include and exclude
    regexes, config defaults.

    Example:
        >>> [p["name"] for p in list_presets()]
        ['pi05']
    """
    chosen = [get_preset(name)] if name is not None else [PRESETS[n] for n in sorted(PRESETS)]
    return [p.to_json() for p in chosen]
