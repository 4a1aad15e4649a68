"""duquant: DuQuant post-training quantization packs for PyTorch models."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from duquant_cli.config import Precision, QuantConfig, Rotation, RowRot, Scheme
from duquant_cli.errors import (
    CheckpointError,
    ConfigError,
    DuQuantError,
    MismatchError,
    PackError,
    TransformError,
)

# Names backed by torch load on first use: torch alone takes seconds to import, and `duquant
# inspect` / `--help` never need it.
_LAZY = {
    "PackSummary": "duquant_cli.commands.pack",
    "pack": "duquant_cli.commands.pack",
    "calibrated_config": "duquant_cli.commands.pack",
    "LayerStats": "duquant_cli.formats.stats",
    "Stats": "duquant_cli.formats.stats",
    "collect_stats": "duquant_cli.runtime.collect",
    "CalibrateSummary": "duquant_cli.commands.calibrate",
    "calibrate": "duquant_cli.commands.calibrate",
    "EvalResult": "duquant_cli.commands.evaluate",
    "evaluate": "duquant_cli.commands.evaluate",
    "ApplyResult": "duquant_cli.commands.apply",
    "apply": "duquant_cli.commands.apply",
    "PackReport": "duquant_cli.commands.inspect",
    "inspect_pack": "duquant_cli.commands.inspect",
    "VerifyReport": "duquant_cli.commands.verify",
    "verify_pack": "duquant_cli.commands.verify",
    "SourceCheck": "duquant_cli.commands.stale",
    "check_source": "duquant_cli.commands.stale",
    "ImportSummary": "duquant_cli.commands.import_legacy",
    "import_legacy": "duquant_cli.commands.import_legacy",
    "PRESETS": "duquant_cli.presets",
    "Preset": "duquant_cli.presets",
    "get_preset": "duquant_cli.presets",
    "Backend": "duquant_cli.runtime.backends",
    "calibrating": "duquant_cli.runtime.calibrate",
    "save_act_scales": "duquant_cli.runtime.calibrate",
    "DuQuantLinear": "duquant_cli.runtime.layer",
    "LoadReport": "duquant_cli.runtime.loader",
    "load_packed": "duquant_cli.runtime.loader",
    "status": "duquant_cli.runtime.status",
    "render_status": "duquant_cli.commands.report",
}

if TYPE_CHECKING:
    from duquant_cli.commands.apply import ApplyResult, apply
    from duquant_cli.commands.calibrate import CalibrateSummary, calibrate
    from duquant_cli.commands.evaluate import EvalResult, evaluate
    from duquant_cli.commands.import_legacy import ImportSummary, import_legacy
    from duquant_cli.commands.inspect import PackReport, inspect_pack
    from duquant_cli.commands.pack import PackSummary, calibrated_config, pack
    from duquant_cli.commands.report import render_status
    from duquant_cli.commands.stale import SourceCheck, check_source
    from duquant_cli.commands.verify import VerifyReport, verify_pack
    from duquant_cli.formats.stats import LayerStats, Stats
    from duquant_cli.presets import PRESETS, Preset, get_preset
    from duquant_cli.runtime.backends import Backend
    from duquant_cli.runtime.calibrate import calibrating, save_act_scales
    from duquant_cli.runtime.collect import collect_stats
    from duquant_cli.runtime.layer import DuQuantLinear
    from duquant_cli.runtime.loader import LoadReport, load_packed
    from duquant_cli.runtime.status import status


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'duquant_cli' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "__version__",
    # configuration
    "Precision",
    "QuantConfig",
    "Rotation",
    "RowRot",
    "Scheme",
    # packing
    "ImportSummary",
    "PackSummary",
    "calibrated_config",
    "import_legacy",
    "pack",
    # calibration and evaluation
    "CalibrateSummary",
    "EvalResult",
    "LayerStats",
    "Stats",
    "calibrate",
    "collect_stats",
    "evaluate",
    # presets
    "PRESETS",
    "Preset",
    "get_preset",
    # inspection
    "ApplyResult",
    "PackReport",
    "SourceCheck",
    "VerifyReport",
    "apply",
    "check_source",
    "inspect_pack",
    "render_status",
    "verify_pack",
    # runtime
    "Backend",
    "DuQuantLinear",
    "LoadReport",
    "calibrating",
    "load_packed",
    "save_act_scales",
    "status",
    # errors
    "CheckpointError",
    "ConfigError",
    "DuQuantError",
    "MismatchError",
    "PackError",
    "TransformError",
]
