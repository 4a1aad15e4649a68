"""duquant: DuQuant post-training quantization packs for PyTorch models."""

from __future__ import annotations

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

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DuQuantError",
    "MismatchError",
    "PackError",
    # configuration
    "Precision",
    "QuantConfig",
    "Rotation",
    "RowRot",
    "Scheme",
    "TransformError",
    "__version__",
]

from duquant_cli.commands.pack import pack  # noqa: E402
from duquant_cli.runtime.backends import Backend  # noqa: E402
from duquant_cli.runtime.calibrate import calibrating, save_act_scales  # noqa: E402
from duquant_cli.runtime.layer import DuQuantLinear  # noqa: E402
from duquant_cli.runtime.loader import LoadReport, load_packed  # noqa: E402
from duquant_cli.runtime.status import status  # noqa: E402

__all__ += [
    # packing
    "pack",
    # runtime
    "Backend",
    "DuQuantLinear",
    "LoadReport",
    "calibrating",
    "load_packed",
    "save_act_scales",
    "status",
]
