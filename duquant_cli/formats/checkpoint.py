"""Read checkpoints one tensor at a time, without the model's code.

Accepted: a `.safetensors` file; a folder with `model.safetensors`, a sharded
`*.safetensors.index.json`, or a `pytorch_model.bin`; a PyTorch `.bin`/`.pt` state dict (loaded
with `weights_only=True` and memory-mapped where the file allows).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from duquant_cli.errors import CheckpointError

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class TensorInfo:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype


class Checkpoint:
    """A read-only view of a checkpoint's tensors; `tensor(key)` loads just that one."""

    def __init__(self, path: Path, files: dict[str, Path]) -> None:
        self.path = path
        self._files = files  # key -> file holding it
        self._handles: dict[Path, object] = {}
        self._infos: dict[str, TensorInfo] = {}

    @property
    def files(self) -> list[Path]:
        return sorted(set(self._files.values()))

    def keys(self) -> list[str]:
        return list(self._files)

    def info(self, key: str) -> TensorInfo:
        if key not in self._infos:
            self._infos[key] = self._read_info(key)
        return self._infos[key]

    def tensor(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def _read_info(self, key: str) -> TensorInfo:
        raise NotImplementedError

    def identity(self) -> dict:
        """What the manifest records about the source: path, files with sizes."""
        return {
            "path": str(self.path),
            "name": checkpoint_name(self.path),
            "files": [{"name": f.name, "bytes": f.stat().st_size} for f in self.files],
        }

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self._handles.clear()


class _SafetensorsCheckpoint(Checkpoint):
    def _handle(self, file: Path):
        if file not in self._handles:
            self._handles[file] = _open_safetensors(file)
        return self._handles[file]

    def _read_info(self, key: str) -> TensorInfo:
        sl = self._handle(self._files[key]).get_slice(key)
        dtype = _ST_DTYPES.get(sl.get_dtype())
        if dtype is None:
            raise CheckpointError(f"{key}: unsupported tensor dtype {sl.get_dtype()}")
        return TensorInfo(key, tuple(sl.get_shape()), dtype)

    def tensor(self, key: str) -> torch.Tensor:
        # A handle of its own, closed at once: pages read through a long-lived memory map stay
        # in the process's resident set, and a 4.6 GB checkpoint would then sit in RAM whole.
        try:
            with _open_safetensors(self._files[key]) as handle:
                return handle.get_tensor(key)
        except SafetensorError as exc:
            raise CheckpointError(f"{self._files[key]}: cannot read {key}: {exc}") from None


class _TorchCheckpoint(Checkpoint):
    def __init__(self, path: Path, state: dict[str, torch.Tensor]) -> None:
        super().__init__(path, dict.fromkeys(state, path))
        self._state = state

    def _read_info(self, key: str) -> TensorInfo:
        t = self._state[key]
        return TensorInfo(key, tuple(t.shape), t.dtype)

    def tensor(self, key: str) -> torch.Tensor:
        return self._state[key]


def _open_safetensors(file: Path):
    if not file.is_file():
        raise CheckpointError(f"{file}: shard listed in the index is missing")
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from None


def _safetensors_keys(file: Path) -> dict[str, Path]:
    return dict.fromkeys(_open_safetensors(file).keys(), file)


def _from_index(index: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {k: index.parent / v for k, v in weight_map.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from None
    for file in sorted(set(files.values())):
        if not file.is_file():
            raise CheckpointError(f"{file}: shard listed in {index.name} is missing")
    return files


def _load_torch(file: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{file}: not a loadable PyTorch state dict ({msg})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{file}: expected a dict of tensors (a state dict)")
    return obj


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a checkpoint file or folder; raises CheckpointError with a one-line reason."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if (path / "model.safetensors").is_file():
            path_file = path / "model.safetensors"
            return _SafetensorsCheckpoint(path, _safetensors_keys(path_file))
        if indexes:
            return _SafetensorsCheckpoint(path, _from_index(indexes[0]))
        singles = sorted(path.glob("*.safetensors"))
        if len(singles) == 1:
            return _SafetensorsCheckpoint(path, _safetensors_keys(singles[0]))
        for name in ("pytorch_model.bin", "model.bin", "model.pt"):
            if (path / name).is_file():
                return _TorchCheckpoint(path, _load_torch(path / name))
        raise CheckpointError(
            f"{path}: no weights found (expected model.safetensors, *.safetensors.index.json "
            "or pytorch_model.bin)"
        )
    if path.name.endswith(".safetensors.index.json"):
        return _SafetensorsCheckpoint(path, _from_index(path))
    if path.suffix == ".safetensors":
        return _SafetensorsCheckpoint(path, _safetensors_keys(path))
    if path.suffix in (".bin", ".pt", ".pth"):
        return _TorchCheckpoint(path, _load_torch(path))
    raise CheckpointError(f"{path}: unsupported checkpoint type (use .safetensors, .bin or .pt)")


def checkpoint_name(path: Path) -> str:
    """A short name for default output folders: the folder name, or the file stem."""
    path = Path(path).resolve()
    if path.is_dir():
        return path.name
    stem = path.name.split(".")[0]
    return path.parent.name if stem in ("model", "pytorch_model") else stem


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's raw bytes as stored (dtype kept): a source weight's identity."""
    data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data).hexdigest()


def source_record(key: str, weight: torch.Tensor, bias_key: str | None) -> dict:
    """What a pack records of a source weight: key, dtype and SHA-256, so staleness can be
    checked later against a checkpoint (`inspect --checkpoint`) or a model (`verify_source`)."""
    return {
        "key": key,
        "dtype": str(weight.dtype).removeprefix("torch."),
        "sha256": tensor_sha256(weight),
        "bias": bias_key,
    }
