"""The pack: a folder of safetensors shards plus `manifest.json` (see docs/pack-format.md).

Writes go to a hidden sibling folder that is renamed into place at the end, so a crash or an
interrupt never leaves a half pack where a pack is expected, and an existing pack is replaced only
with `force`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from duquant_cli.config import Precision, QuantConfig
from duquant_cli.errors import ConfigError, PackError
from duquant_cli.formats.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    LayerEntry,
    TensorRef,
    read_manifest,
)

SHARD_BYTES = 512 << 20
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "int8": torch.int8,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Write one tensor file; returns its manifest record (name, bytes, sha256).

    The safetensors metadata is a single JSON string: several keys would be written in a random
    order, and the same pack must give the same bytes.
    """
    meta = {"duquant": json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION})}
    try:
        save_file(tensors, str(path), metadata=meta)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(path, 0o666 & ~umask)  # save_file creates 0600; a pack is meant to be shared
    except (OSError, SafetensorError) as exc:
        raise PackError(f"{path}: write failed ({exc})") from None
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


class PackWriter:
    """Streams layers into size-bounded shards inside a temporary folder; `commit` publishes.

    Use as a context manager: leaving the block with an exception removes the temporary folder.
    """

    def __init__(self, out_dir: Path, *, force: bool = False, shard_bytes: int = SHARD_BYTES):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not force:
            raise PackError(f"{self.out_dir}: already exists (use --force to replace it)")
        parent = self.out_dir.parent
        self.tmp = parent / f".{self.out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir()
        except OSError as exc:
            raise PackError(f"{parent}: cannot write the pack here ({exc.strerror})") from None
        self.shard_bytes = shard_bytes
        self.entries: list[LayerEntry] = []
        self.files: list[dict[str, Any]] = []
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffered = 0

    @property
    def _shard_name(self) -> str:
        return f"tensors-{len(self.files) + 1:05d}.safetensors"

    def add(
        self,
        name: str,
        tensors: dict[str, torch.Tensor],
        *,
        shape: tuple[int, int],
        precision: Precision,
        transform: dict[str, Any],
        quant: dict[str, Any],
        source: dict[str, Any],
        info: dict[str, float],
    ) -> LayerEntry:
        refs = {}
        for f, t in tensors.items():
            if t.dtype not in DTYPE_NAMES:
                raise PackError(f"{name}.{f}: cannot store dtype {t.dtype}")
            key = f"{name}.{f}"
            self._buffer[key] = t.detach().contiguous().cpu()
            self._buffered += t.numel() * t.element_size()
            refs[f] = TensorRef(key, tuple(t.shape), DTYPE_NAMES[t.dtype])
        entry = LayerEntry(
            name,
            shape[0],
            shape[1],
            precision,
            transform,
            quant,
            self._shard_name,
            refs,
            source,
            info,
        )
        self.entries.append(entry)
        if self._buffered >= self.shard_bytes:
            self._flush()
        return entry

    def _flush(self) -> None:
        if not self._buffer:
            return
        self.files.append(write_shard(self.tmp / self._shard_name, self._buffer))
        self._buffer, self._buffered = {}, 0

    def commit(self, header: dict[str, Any]) -> Path:
        """Write the last shard and the manifest, then move the folder into place atomically."""
        self._flush()
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **header,
            "files": self.files,
            "layers": [e.to_json() for e in self.entries],
        }
        tmp_manifest = self.tmp / MANIFEST
        try:
            tmp_manifest.write_text(json.dumps(manifest, indent=1) + "\n")
            if self.out_dir.exists():
                old = self.out_dir.parent / f".{self.out_dir.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(self.out_dir, old)
                os.replace(self.tmp, self.out_dir)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(self.tmp, self.out_dir)
        except OSError as exc:
            raise PackError(f"{self.out_dir}: could not publish the pack ({exc})") from None
        return self.out_dir

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> PackWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self.tmp.exists():
            self.abort()


class Pack:
    """A pack opened for reading: manifest parsed and checked; tensors loaded per layer."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        try:
            self.config = QuantConfig.from_json(manifest["config"])
        except (KeyError, ConfigError) as exc:
            raise PackError(f"{path / MANIFEST}: invalid config ({exc})") from None
        raw = manifest.get("layers")
        if not isinstance(raw, list):
            raise PackError(f"{path / MANIFEST}: 'layers' must be a list")
        self.layers: dict[str, LayerEntry] = {}
        for d in raw:
            if not isinstance(d, dict):
                raise PackError(f"{path / MANIFEST}: each layer must be a JSON object")
            entry = LayerEntry.from_json(d)
            if entry.name in self.layers:
                raise PackError(f"{path / MANIFEST}: layer {entry.name!r} listed twice")
            self.layers[entry.name] = entry
        self._handles: dict[str, Any] = {}

    @classmethod
    def open(cls, path: str | Path) -> Pack:
        path = Path(path)
        return cls(path, read_manifest(path))

    def _handle(self, file: str):
        if file not in self._handles:
            fpath = self.path / file
            if not fpath.is_file():
                raise PackError(f"{fpath}: tensor file listed in the manifest is missing")
            try:
                self._handles[file] = safe_open(str(fpath), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise PackError(f"{fpath}: unreadable tensor file ({exc})") from None
        return self._handles[file]

    def load(self, name: str) -> dict[str, torch.Tensor]:
        """The layer's tensors by field, checked against the manifest's shapes and dtypes."""
        entry = self.layers[name]
        out = {}
        for f, ref in entry.tensors.items():
            file = ref.file or entry.file
            try:
                t = self._handle(file).get_tensor(ref.key)
            except (SafetensorError, OSError) as exc:
                where = self.path / file
                raise PackError(f"{where}: cannot read {ref.key} ({exc})") from None
            if tuple(t.shape) != ref.shape or t.dtype != DTYPES[ref.dtype]:
                raise PackError(
                    f"layer {name!r}: tensor {f!r} is {tuple(t.shape)} {t.dtype}, manifest says "
                    f"{ref.shape} {ref.dtype}"
                )
            out[f] = t
        return out

    @property
    def nbytes(self) -> int:
        return sum(f.get("bytes", 0) for f in self.manifest.get("files", []))
