"""Presets: the layer selection (and config defaults) a model family's users ran, as data.

A preset is a small table: regexes matched against layer names (checkpoint keys without
`.weight`, which are also the model's module names) and a few `QuantConfig` defaults. `duquant
pack --preset`, `duquant calibrate --preset` and `load_packed(..., preset=)` read the same row,
so a pack, its statistics and its runtime always agree on which layers are quantized.

Torch-free (like `config.py`), so `duquant presets` answers instantly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from duquant_cli.config import QuantConfig, compile_regex
from duquant_cli.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from duquant_cli.formats.selection import Selection


@dataclass(frozen=True)
class Preset:
    """One row of the table.

    Args:
        name: what `--preset` takes.
        description: one line for `duquant presets`.
        include: a layer is in the preset when some include regex `re.search`-matches its name...
        exclude: ...and no exclude regex does (excludes also win over a user's extra --include).
        defaults: `QuantConfig` fields in their JSON form (as in a manifest's `config`); options
            given explicitly override them.
    """

    name: str
    description: str
    include: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        for pattern in self.include + self.exclude:
            compile_regex(pattern, f"preset {self.name}")
        QuantConfig.from_json(dict(self.defaults))  # fail at import, not at first use

    def matches(self, name: str) -> bool:
        """Whether layer (or module) `name` is one the preset quantizes."""
        return any(re.search(p, name) for p in self.include) and not any(
            re.search(p, name) for p in self.exclude
        )

    def config(
        self, base: QuantConfig, explicit: set[str] | frozenset[str] = frozenset()
    ) -> QuantConfig:
        """`base` with the preset's defaults applied to every field not in `explicit`."""
        changes = {k: v for k, v in self.defaults.items() if k not in explicit}
        return QuantConfig.from_json(base.to_json() | changes)

    def selection(
        self,
        include: tuple[str, ...] = (),
        exclude: tuple[str, ...] = (),
        scope: str = "",
        default_exclude: bool = True,
    ) -> Selection:
        """The pack `Selection` of the preset, widened by `include` and narrowed by `exclude`."""
        # Imported here: selection.py reads checkpoints (torch), and listing presets must not.
        from duquant_cli.formats.selection import Selection

        inc, exc = self.include + tuple(include), self.exclude + tuple(exclude)
        return Selection(inc, exc, scope, default_exclude)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "include": list(self.include),
            "exclude": list(self.exclude),
            "defaults": dict(self.defaults),
        }


# Layer names may carry a prefix (a wrapper module), so patterns start at a name boundary.
_AT = r"(^|\.)"
PI05 = Preset(
    name="pi05",
    description=(
        "openpi pi0.5 policy: the PaliGemma language model's attention and MLP projections and "
        "the action expert's MLP; never the vision tower, projector, heads, norms or time MLPs"
    ),
    include=(
        _AT + r"paligemma_with_expert\.paligemma\.model\.language_model\.layers\.\d+\."
        r"(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$",
        _AT + r"paligemma_with_expert\.gemma_expert\.model\.layers\.\d+\.mlp\.(gate|up|down)_proj$",
    ),
    exclude=(
        r"(?i)norm",
        r"(?i)embed",
        r"vision_tower",
        r"multi_modal_projector",
        r"lm_head",
        _AT + r"action_(in|out)_proj$",
        r"time_mlp",
        _AT + r"state_proj$",
    ),
    defaults=MappingProxyType({"precision": "w4a8", "block": 16}),
)

PRESETS: Mapping[str, Preset] = MappingProxyType({p.name: p for p in (PI05,)})


def get_preset(name: str) -> Preset:
    """The preset called `name`; ConfigError listing the known ones otherwise."""
    preset = PRESETS.get(name)
    if preset is None:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(sorted(PRESETS))}")
    return preset
