"""The earlier openpi-side DuQuant packs: a folder of per-layer `.npz` files (read only).

One file per layer, named `sanitize_name(layer) + ".npz"`. Keys:
    meta          JSON string: in_features, out_features, block_size, block_out_size,
                  enable_permute, lambda_smooth
    perm          int64 [in] (optional): x' = x[..., perm]
    R_in_blocks   int64 block indices b with a `Rin_<b>`: float32 [s, s], s the size of input
                  block b of x' (block_size; the last one smaller for a tail)
    R_out_blocks  int64 block indices b with a `Rout_<b>`, over output rows (block_out_size)
    weight_scale  float32 [out]: per-row scales for 4 bits before the row rotation; the legacy
                  runtime ignored it (and so does the importer)
A block without a matrix was left as is (identity) by the legacy runtime, and is here.
The file name is a lossy sanitization of the layer name, so files are matched to layers by
sanitizing each candidate name the same way (`match_files`).
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from duquant_cli.errors import CheckpointError, MismatchError, TransformError
from duquant_cli.math.blocks import BlockDiag, split_sizes

SOURCE_FORMAT = "openpi-duquant-npz"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def sanitize_name(name: str) -> str:
    """The legacy file stem of a layer: characters outside [A-Za-z0-9_.-] become '_', then
    every '..' becomes '.' (one pass, as the legacy writer did)."""
    return _UNSAFE.sub("_", name).replace("..", ".")


@dataclass(frozen=True)
class LegacyLayer:
    """One file: `meta` as stored; `perm` int64 [in] or None; `rin`/`rout`: block index ->
    float32 block, as stored (not yet checked against the layer's block sizes)."""

    path: Path
    meta: dict[str, Any]
    perm: torch.Tensor | None
    rin: dict[int, torch.Tensor]
    rout: dict[int, torch.Tensor]

    def _size(self, key: str, blocks: dict[int, torch.Tensor], fallback: int | None) -> int:
        """A block size from meta; else, as the legacy runtime did, the first block's size."""
        value = self.meta.get(key)
        if value is None:
            value = fallback if fallback is not None else _first_size(blocks)
        if value is None or int(value) < 1:
            raise CheckpointError(f"{self.path}: meta has no usable {key} ({value!r})")
        return int(value)

    @property
    def block_size(self) -> int:
        return self._size("block_size", self.rin, None if self.rin else 16)

    @property
    def block_out_size(self) -> int:
        return self._size("block_out_size", self.rout, None if self.rout else self.block_size)


def _first_size(blocks: dict[int, torch.Tensor]) -> int | None:
    return int(next(iter(blocks.values())).shape[0]) if blocks else None


def _blocks(npz: Any, path: Path, index_key: str, prefix: str) -> dict[int, torch.Tensor]:
    if index_key not in npz.files:
        return {}
    indices = npz[index_key]
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise CheckpointError(f"{path}: {index_key} must be a 1-D integer array")
    out = {}
    for b in indices.tolist():  # one stored matrix per block: a loop over file entries
        key = f"{prefix}{b}"
        if key not in npz.files:
            raise CheckpointError(f"{path}: {index_key} lists block {b} but {key} is missing")
        m = npz[key]
        if m.ndim != 2 or m.shape[0] != m.shape[1]:
            raise CheckpointError(f"{path}: {key} is {list(m.shape)}, expected a square matrix")
        out[int(b)] = torch.from_numpy(np.asarray(m, dtype=np.float32))
    return out


def read_layer(path: str | Path) -> LegacyLayer:
    """Read one legacy `.npz` file (no pickle); CheckpointError with the reason otherwise."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "meta" not in npz.files:
                raise CheckpointError(f"{path}: no 'meta' entry; not a legacy DuQuant file")
            raw = npz["meta"].tolist()
            meta = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
            if not isinstance(meta, dict):
                raise CheckpointError(f"{path}: meta is not a JSON object")
            perm = None
            if "perm" in npz.files:
                p = npz["perm"]
                if p.ndim != 1 or not np.issubdtype(p.dtype, np.integer):
                    raise CheckpointError(f"{path}: perm must be a 1-D integer array")
                perm = torch.from_numpy(p.astype(np.int64))
            rin = _blocks(npz, path, "R_in_blocks", "Rin_")
            rout = _blocks(npz, path, "R_out_blocks", "Rout_")
    except (OSError, ValueError, TypeError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: not a readable legacy .npz file ({exc})") from None
    return LegacyLayer(path, meta, perm, rin, rout)


def block_diag(
    blocks: dict[int, torch.Tensor], n: int, block: int, what: str, path: Path
) -> BlockDiag | None:
    """The legacy blocks of a dimension n as our `BlockDiag` (full blocks + tail), blocks
    without a matrix filled with the identity. Each stored matrix is cut to its block's size,
    as the legacy runtime did (`R[:s, :s]`); a smaller one, or a block index past the end, is
    an error naming the file and block. None when there are no blocks."""
    if not blocks:
        return None
    k, tail = split_sizes(n, block)
    b = min(block, n)
    count = k + (1 if tail else 0)
    sizes = {i: b for i in range(k)} | ({k: tail} if tail else {})
    for i, m in blocks.items():
        if i < 0 or i >= count:
            raise CheckpointError(f"{path}: {what}_{i} is past the {count} block(s) of {n}")
        if m.shape[0] < sizes[i]:
            raise CheckpointError(
                f"{path}: {what}_{i} is {list(m.shape)}, block {i} has {sizes[i]} channels"
            )
    full = torch.eye(b).repeat(k, 1, 1)
    idx = [i for i in sorted(blocks) if i < k]
    if idx:
        full[idx] = torch.stack([blocks[i][:b, :b] for i in idx])
    last = None
    if tail:
        last = blocks[k][:tail, :tail].clone() if k in blocks else torch.eye(tail)
    return BlockDiag(full.contiguous(), last)


def check_orthogonal(bd: BlockDiag, what: str, path: Path, tol: float) -> float:
    """max |RR^T - I| over the blocks; TransformError naming the worst block past `tol`."""
    mats = bd.blocks.double()
    errs = (mats @ mats.mT - torch.eye(mats.shape[-1], dtype=mats.dtype)).abs().amax((-2, -1))
    if bd.tail is not None:
        t = bd.tail.double()
        tail_err = (t @ t.mT - torch.eye(t.shape[0], dtype=t.dtype)).abs().amax()
        errs = torch.cat([errs, tail_err[None]])
    worst = int(errs.argmax())
    err = float(errs[worst])
    if not err < tol:
        raise TransformError(
            f"{path}: {what}_{worst} is not orthogonal (max |RR^T - I| = {err:.1e}, tolerance "
            f"{tol:g}); this legacy file cannot be converted exactly"
        )
    return err


def match_files(npz_dir: str | Path, names: list[str]) -> dict[str, Path]:
    """Layer name -> its legacy file, for every `.npz` in `npz_dir`, in the order of `names`.

    Each name is sanitized the way the legacy writer named files; a file that no name, or more
    than one name, sanitizes to is an error listing every such file.
    """
    npz_dir = Path(npz_dir)
    if not npz_dir.is_dir():
        raise CheckpointError(f"{npz_dir}: no such folder of legacy .npz files")
    files = sorted(p for p in npz_dir.glob("*.npz") if p.is_file())
    if not files:
        raise CheckpointError(f"{npz_dir}: no .npz files (expected one legacy file per layer)")
    by_stem: dict[str, list[str]] = {}
    for name in names:
        by_stem.setdefault(sanitize_name(name), []).append(name)
    unmatched, ambiguous, found = [], [], {}
    for f in files:
        candidates = by_stem.get(f.name[: -len(".npz")], [])
        if not candidates:
            unmatched.append(f.name)
        elif len(candidates) > 1:
            ambiguous.append(f"{f.name} ({' / '.join(candidates)})")
        else:
            found[candidates[0]] = f
    problems = []
    if unmatched:
        problems.append(f"{len(unmatched)} file(s) match no linear layer: {_few(unmatched)}")
    if ambiguous:
        problems.append(f"{len(ambiguous)} file(s) match several layers: {_few(ambiguous)}")
    if problems:
        raise MismatchError(f"{npz_dir}: " + "; ".join(problems))
    return {name: found[name] for name in names if name in found}


def _few(items: list[str], limit: int = 6) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
