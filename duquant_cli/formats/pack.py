"""The pack: a folder of safetensors shards plus `manifest.json` (see docs/pack-format.md).

Writes go to a hidden sibling folder that is renamed into place at the end, so a crash or an
interrupt never leaves a half pack where a pack is expected, and an existing pack is replaced only
with `force`. One writer per output (a lock file); finished layers are journaled, so an
interrupted run resumes. Reads trust nothing: sizes in the manifest and in each file's header are
checked against the files before a tensor is read, and nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save, save_file

from duquant_cli.config import Precision, QuantConfig
from duquant_cli.errors import ConfigError, PackError
from duquant_cli.formats.lock import WriterLock
from duquant_cli.formats.manifest import (
    FORMAT,
    FORMAT_VERSION,
    ITEMSIZE,
    MANIFEST,
    LayerEntry,
    TensorRef,
    file_sizes,
    read_manifest,
)

SHARD_BYTES = 512 << 20
JOB = "job.json"  # in the partial folder: what the run was started with
JOURNAL = "journal.jsonl"  # in the partial folder: one line per finished layer and shard
MAX_HEADER = 100 << 20  # safetensors' own limit on a file's JSON header
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


def write_shard(
    path: Path, tensors: dict[str, torch.Tensor], durable: bool = False
) -> dict[str, Any]:
    """Write one tensor file; returns its manifest record (name, bytes, sha256).

    The safetensors metadata is a single JSON string: several keys would be written in a random
    order, and the same pack must give the same bytes. `durable` flushes it to disk before
    returning (a shard about to be published or journaled).
    """
    meta = {"duquant": json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION})}
    try:
        save_file(tensors, str(path), metadata=meta)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(path, 0o666 & ~umask)  # save_file creates 0600; a pack is meant to be shared
        if durable:
            _fsync(path)
    except (OSError, SafetensorError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise PackError(f"{path}: write failed ({why})") from None
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


class PackWriter:
    """Stages each layer as it is added, assembles size-bounded shards from the staged layers in
    order, and publishes the finished folder with one rename in `commit`.

    Everything happens in `.<NAME>.partial` beside the output, under the writer lock
    `.<NAME>.lock` (one writer per output). Each finished layer is a file `layers/NNNNN.safetensors`
    (named by its index, never by the layer name) plus a line in `journal.jsonl`; once a shard's
    worth of layers is staged it is written to `pack/` and journaled, and its staged layers are
    deleted. Shard boundaries depend only on the layers' sizes in order, so a resumed run writes
    the same bytes as an uninterrupted one. Staged layers are not kept in memory: a shard is
    assembled from their files, so the writer never holds a shard's worth (512 MiB) while the
    next layer's pack temporaries are allocated, and resumed and fresh runs share one path.

    With a `job` (the caller's description of the run: options and source), an interrupted run
    (Ctrl-C, a kill, a full disk) leaves the partial folder and `resume=True` continues it:
    `resumed` then holds the finished layers' entries (a string: the reason a layer was skipped).
    Any other exception removes the partial folder. Use as a context manager.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        force: bool = False,
        shard_bytes: int = SHARD_BYTES,
        resume: bool = False,
        job: dict[str, Any] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        parent = self.out_dir.parent
        self.tmp = parent / f".{self.out_dir.name}.partial"
        self.shard_bytes = shard_bytes
        self.job = None if job is None else json.loads(json.dumps(job))
        self.records: list[dict[str, Any]] = []  # one per layer, in order (journal lines)
        self.shards: list[dict[str, Any]] = []  # one per written shard (journal lines)
        self.resumed: list[LayerEntry | str] = []
        self._assembled = 0  # records covered by written shards
        self._journal: Any = None  # the journal, open for appending
        self._io_failed = False
        self._committed = False
        self._made = [p for p in (parent, *parent.parents) if not p.exists()]
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            why = "not a folder" if isinstance(exc, FileExistsError) else exc.strerror
            raise PackError(f"{parent}: cannot write the pack here ({why})") from None
        self.lock = WriterLock(parent / f".{self.out_dir.name}.lock", self.out_dir)
        try:
            self.lock.acquire()
            self._start(force, resume)
        except BaseException:
            self.lock.release()
            self._remove_made()
            raise

    # -- starting and resuming ------------------------------------------------------------------

    def _start(self, force: bool, resume: bool) -> None:
        if self.out_dir.exists() and not force:
            raise PackError(f"{self.out_dir}: already exists (use --force to replace it)")
        if self.tmp.exists() or self.tmp.is_symlink():
            if resume and self.job is not None and self._resume():
                return
            if not (force or resume):
                how = "pass --resume to continue it or --force" if self.job else "use --force"
                raise PackError(
                    f"{self.out_dir}: an interrupted run left {self.tmp.name} beside it; "
                    f"{how} to start over"
                )
            self._discard(self.tmp)
        try:
            (self.tmp / "layers").mkdir(parents=True)
            (self.tmp / "pack").mkdir()
            if self.job is not None:
                _write_durable(self.tmp / JOB, (json.dumps(self.job, indent=1) + "\n").encode())
            (self.tmp / JOURNAL).touch()
        except OSError as exc:
            self._discard(self.tmp)
            raise PackError(f"{self.tmp}: cannot write the pack here ({exc.strerror})") from None

    def _resume(self) -> bool:
        """Take over the partial folder's finished work; False when it holds none worth keeping.

        Raises PackError (leaving the folder as it is) when it was started with other options
        or from another source.
        """
        try:
            stored = json.loads((self.tmp / JOB).read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            return False  # written before any layer: nothing to lose
        if stored != self.job:
            stored = stored if isinstance(stored, dict) else {}
            keys = stored.keys() | self.job.keys()
            differ = sorted(k for k in keys if stored.get(k) != self.job.get(k))
            raise PackError(
                f"{self.tmp}: cannot --resume: the interrupted run used a different "
                f"{', '.join(differ)}; run again with the same checkpoint and options, "
                "or pass --force (without --resume) to start over"
            )
        self._replay(_read_journal(self.tmp / JOURNAL))
        self._rewrite_journal()
        self._tidy()
        self.resumed = [
            LayerEntry.from_json(r["entry"]) if "entry" in r else str(r["skipped"])
            for r in self.records
        ]
        self._assemble(final=False)
        return True

    def _replay(self, lines: list[dict[str, Any]]) -> None:
        """Accept the journal's longest prefix that the files on disk still back."""
        for rec in lines:
            if "shard" in rec:
                if not self._shard_ok(rec):
                    break
                self.shards.append(rec)
                self._assembled += rec["count"]
            elif self._layer_record_ok(rec):
                self.records.append(rec)
            else:
                break
        keep = self._assembled
        for rec in self.records[self._assembled :]:
            if "entry" in rec and not self._staged_ok(rec):
                break
            keep += 1
        del self.records[keep:]

    def _layer_record_ok(self, rec: dict[str, Any]) -> bool:
        if rec.get("index") != len(self.records) or not isinstance(rec.get("name"), str):
            return False
        if "skipped" in rec:
            return isinstance(rec["skipped"], str)
        entry = rec.get("entry")
        if not isinstance(entry, dict) or not isinstance(rec.get("bytes"), int):
            return False
        try:
            parsed = LayerEntry.from_json(entry)
        except PackError:
            return False
        return parsed.name == rec["name"] and parsed.file == self._shard_name

    def _shard_ok(self, rec: dict[str, Any]) -> bool:
        first, count, path = rec.get("first"), rec.get("count"), self.tmp / "pack" / rec["shard"]
        return (
            rec["shard"] == self._shard_name
            and first == self._assembled
            and isinstance(count, int)
            and 0 < count <= len(self.records) - self._assembled
            and path.is_file()
            and path.stat().st_size == rec.get("bytes")
            and sha256_file(path) == rec.get("sha256")
        )

    def _staged_ok(self, rec: dict[str, Any]) -> bool:
        path = self._staged(rec["index"])
        return path.is_file() and sha256_file(path) == rec.get("sha256")

    def _rewrite_journal(self) -> None:
        """The journal as accepted: shard lines after the layers they cover, in write order."""
        lines: list[dict[str, Any]] = []
        done = 0
        for shard in self.shards:
            lines += [*self.records[done : shard["first"] + shard["count"]], shard]
            done = shard["first"] + shard["count"]
        lines += self.records[done:]
        text = "".join(json.dumps(line) + "\n" for line in lines)
        try:
            _write_durable(self.tmp / JOURNAL, text.encode())
        except OSError as exc:
            raise PackError(f"{self.tmp / JOURNAL}: cannot rewrite ({exc.strerror})") from None

    def _tidy(self) -> None:
        """Remove what the accepted journal does not account for (redone from scratch)."""
        shards = {s["shard"] for s in self.shards}
        pending = {self._staged(r["index"]).name for r in self.records[self._assembled :]}
        for folder, keep in ((self.tmp / "pack", shards), (self.tmp / "layers", pending)):
            folder.mkdir(exist_ok=True)
            for p in folder.iterdir():
                if p.name not in keep:
                    self._discard(p)

    # -- adding layers ----------------------------------------------------------------------------

    @property
    def _shard_name(self) -> str:
        return f"tensors-{len(self.shards) + 1:05d}.safetensors"

    def _staged(self, index: int) -> Path:
        return self.tmp / "layers" / f"{index:05d}.safetensors"

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
        """Stage one layer (it joins the shard being filled) and journal it."""
        refs, stored = {}, {}
        for f, t in tensors.items():
            if t.dtype not in DTYPE_NAMES:
                raise PackError(f"{name}.{f}: cannot store dtype {t.dtype}")
            key = f"{name}.{f}"
            stored[key] = t.detach().contiguous().cpu()
            refs[f] = TensorRef(key, tuple(t.shape), DTYPE_NAMES[t.dtype])
        entry = LayerEntry(
            name, shape[0], shape[1], precision, transform, quant, self._shard_name, refs,
            source, info,
        )  # fmt: skip
        index = len(self.records)
        stored = _unshared(stored)
        data = save(stored)
        # Written in place and not flushed to disk: the journal line comes after the whole file,
        # and its hash catches a staged file that a crash cut short.
        self._io(_write_plain, self._staged(index), data)
        digest = hashlib.sha256(data).hexdigest()
        rec = {"index": index, "name": name, "bytes": entry.nbytes, "sha256": digest}
        self._record(rec | {"entry": entry.to_json()})
        del stored, data
        self._assemble(final=False)
        return entry

    def skip(self, name: str, reason: str) -> None:
        """Journal a layer left out of the pack (it keeps its index, so a resume lines up)."""
        self._record({"index": len(self.records), "name": name, "skipped": reason})

    def _record(self, rec: dict[str, Any]) -> None:
        line = json.dumps(rec) + "\n"
        self._io(self._append, self.tmp / JOURNAL, line)
        self.records.append(json.loads(line))  # what a resumed run would read back

    def _append(self, path: Path, line: str) -> None:
        if self._journal is None:
            self._journal = open(path, "a", encoding="utf-8")  # noqa: SIM115 (kept open)
        self._journal.write(line)
        self._journal.flush()

    def _close_journal(self) -> None:
        if self._journal is not None:
            with contextlib.suppress(OSError):
                self._journal.close()
            self._journal = None

    def _io(self, fn, path: Path, *args: Any) -> Any:
        """Run one write; an OS error becomes a one-line PackError and keeps the finished work."""
        try:
            return fn(path, *args)
        except (OSError, SafetensorError, PackError) as exc:
            self._io_failed = True
            why = getattr(exc, "strerror", None) or _line(exc)
            msg = why if isinstance(exc, PackError) else f"{path}: write failed ({why})"
            if self.job is not None and self.records:
                msg += "; the finished layers are kept: fix this and rerun with --resume"
            raise PackError(msg) from None

    def _assemble(self, final: bool) -> None:
        """Write every shard whose layers are all staged: a shard closes once it holds at least
        `shard_bytes` (or, when `final`, with whatever is left)."""
        while self._assembled < len(self.records):
            total, end = 0, None
            for j in range(self._assembled, len(self.records)):
                total += self.records[j].get("bytes", 0)
                if total >= self.shard_bytes:
                    end = j + 1
                    break
            if end is None:
                if not final:
                    return
                end = len(self.records)
            self._write_shard(self._assembled, end)

    def _write_shard(self, first: int, end: int) -> None:
        recs = [r for r in self.records[first:end] if "entry" in r]
        if not recs:  # only skipped layers: no file
            self._assembled = end
            return
        tensors: dict[str, torch.Tensor] = {}
        for rec in recs:
            tensors |= self._io(self._read_staged, self._staged(rec["index"]))
        tensors = _unshared(tensors)  # layers fed one input may hand in the same transform
        name = self._shard_name
        record = self._io(write_shard, self.tmp / "pack" / name, tensors, True)
        del tensors
        shard = {"shard": name, "first": first, "count": end - first} | {
            "bytes": record["bytes"],
            "sha256": record["sha256"],
        }
        self._io(self._append, self.tmp / JOURNAL, json.dumps(shard) + "\n")
        self.shards.append(shard)
        self._assembled = end
        for rec in recs:
            self._staged(rec["index"]).unlink(missing_ok=True)

    @staticmethod
    def _read_staged(path: Path) -> dict[str, torch.Tensor]:
        """A staged layer's tensors, read back to assemble its shard (an interrupted run's were
        hash-checked when the run resumed). The file's memory map is closed on return."""
        try:
            with safe_open(str(path), framework="pt") as fh:
                return {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
        except (SafetensorError, OSError) as exc:
            raise PackError(f"{path}: cannot read a staged layer back ({_line(exc)})") from None

    # -- publishing -------------------------------------------------------------------------------

    @property
    def entries(self) -> list[LayerEntry]:
        return [LayerEntry.from_json(r["entry"]) for r in self.records if "entry" in r]

    @property
    def files(self) -> list[dict[str, Any]]:
        """The manifest's `files`: one record per shard written so far."""
        keys = ("bytes", "sha256")
        return [{"name": s["shard"]} | {k: s[k] for k in keys} for s in self.shards]

    def commit(self, header: dict[str, Any]) -> Path:
        """Write the last shard and the manifest, then move the folder into place atomically."""
        self._assemble(final=True)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **header,
            "files": self.files,
            "layers": [r["entry"] for r in self.records if "entry" in r],
        }
        text = json.dumps(manifest, indent=1) + "\n"
        self._io(_write_durable, self.tmp / "pack" / MANIFEST, text.encode())
        self._close_journal()
        if not self.lock.still_held():  # another run took it over: its files, not ours now
            self._committed = True
            raise PackError(f"{self.lock.path}: the writer lock was taken over; not publishing")
        try:
            if self.out_dir.exists():
                old = self.out_dir.parent / f".{self.out_dir.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(self.out_dir, old)
                os.replace(self.tmp / "pack", self.out_dir)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(self.tmp / "pack", self.out_dir)
        except OSError as exc:
            self._io_failed = True
            raise PackError(f"{self.out_dir}: could not publish the pack ({exc})") from None
        self._committed = True
        _fsync_dir(self.out_dir.parent)
        shutil.rmtree(self.tmp, ignore_errors=True)
        return self.out_dir

    def abort(self) -> None:
        """Remove the partial folder (and any parent folder this writer created)."""
        self._close_journal()
        self._discard(self.tmp)
        self._remove_made()

    @staticmethod
    def _discard(path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def _remove_made(self) -> None:
        for p in self._made:  # deepest first; stops at the first that is not empty
            try:
                p.rmdir()
            except OSError:
                break

    def __enter__(self) -> PackWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self._committed:
                return
            resumable = exc is not None and (
                self._io_failed
                or not isinstance(exc, Exception)  # KeyboardInterrupt, SystemExit
                or isinstance(exc, (OSError, MemoryError))
            )
            if not (resumable and self.job is not None and self.records):
                self.abort()
        finally:
            self._close_journal()
            self.lock.release()


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors with every storage held once: safetensors refuses to write two keys that share
    memory, and layers fed the same input may store the very same transform tensor."""
    seen: set[int] = set()
    out = {}
    for key, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        out[key] = t.clone() if ptr in seen and t.numel() else t
        seen.add(ptr)
    return out


def _write_durable(path: Path, data: bytes) -> None:
    """Write a whole file under a temporary name, flush it to disk, then rename it into place:
    never half there, and there after a crash."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _write_plain(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_journal(path: Path) -> list[dict[str, Any]]:
    """The journal's complete lines up to the first that does not parse (a kill mid-write)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    out = []
    for line in text.split("\n")[:-1]:  # the last piece has no newline: incomplete or empty
        try:
            rec = json.loads(line)
        except ValueError:
            break
        if not isinstance(rec, dict) or not (
            isinstance(rec.get("shard"), str) or isinstance(rec.get("index"), int)
        ):
            break
        out.append(rec)
    return out


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
        self._sizes = file_sizes(manifest, path / MANIFEST)
        self._handles: dict[str, Any] = {}
        self._headers: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}

    @classmethod
    def open(cls, path: str | Path) -> Pack:
        path = Path(path)
        return cls(path, read_manifest(path))

    def _handle(self, file: str):
        """The open file and its checked header; its size must be the manifest's."""
        if file not in self._handles:
            fpath = self.path / file
            if not fpath.is_file():
                raise PackError(f"{fpath}: tensor file listed in the manifest is missing")
            try:
                size = fpath.stat().st_size
                listed = self._sizes.get(file)
                if listed is not None and size != listed:
                    raise PackError(
                        f"{fpath}: {size} bytes on disk, the manifest says {listed} "
                        "(truncated or replaced?)"
                    )
                header = read_header(fpath)
                self._handles[file] = safe_open(str(fpath), framework="pt")
            except (SafetensorError, OSError, ValueError) as exc:
                raise PackError(f"{fpath}: unreadable tensor file ({_line(exc)})") from None
            self._headers[file] = header
        return self._handles[file], self._headers[file]

    def load(self, name: str) -> dict[str, torch.Tensor]:
        """The layer's tensors by field, checked against the manifest's shapes and dtypes.

        Each tensor's dtype and shape are compared in the file's header first, so nothing is
        allocated for a tensor the manifest or the header misdescribes.
        """
        entry = self.layers.get(name)
        if entry is None:
            raise PackError(f"{self.path}: no layer {name!r} in the pack")
        out = {}
        for f, ref in entry.tensors.items():
            file = ref.file or entry.file
            handle, header = self._handle(file)
            where = self.path / file
            if ref.key not in header:
                raise PackError(f"{where}: cannot read {ref.key} (no such tensor in the file)")
            dtype, shape = header[ref.key]
            if shape != ref.shape or dtype != ref.dtype:
                raise PackError(
                    f"layer {name!r}: tensor {f!r} is {shape} torch.{dtype}, manifest says "
                    f"{ref.shape} {ref.dtype}"
                )
            try:
                t = handle.get_tensor(ref.key)
            except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
                raise PackError(f"{where}: cannot read {ref.key} ({_line(exc)})") from None
            if tuple(t.shape) != ref.shape or t.dtype != DTYPES[ref.dtype]:
                raise PackError(
                    f"layer {name!r}: tensor {f!r} is {tuple(t.shape)} {t.dtype}, manifest says "
                    f"{ref.shape} {ref.dtype}"
                )
            out[f] = t
        return out

    @property
    def nbytes(self) -> int:
        return sum(self._sizes.values())


# safetensors dtype names -> (the pack's dtype name where it has one, bytes per element)
_ST_DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2),
    "BF16": ("bfloat16", 2), "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2),
    "I8": ("int8", 1), "U64": ("uint64", 8), "U32": ("uint32", 4), "U16": ("uint16", 2),
    "U8": ("uint8", 1), "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}  # fmt: skip
assert all(_ST_DTYPES[k][1] == ITEMSIZE[v] for k, (v, _) in _ST_DTYPES.items() if v in ITEMSIZE)


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """A safetensors file's tensors as {key: (dtype name, shape)}, read and checked here.

    The 8-byte length, the JSON and every tensor's byte range are checked against the file's size
    (each range must hold exactly shape x dtype bytes), so a header that claims more than the
    file holds is refused before anything is allocated for it.
    """
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= min(MAX_HEADER, size - 8):
            raise PackError(f"{path}: not a safetensors file (bad header length)")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise PackError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise PackError(f"{path}: not a safetensors file (header is not a JSON object)")
    data = size - 8 - n
    out = {}
    for key, v in header.items():
        if key == "__metadata__":
            continue
        st = _ST_DTYPES.get(v.get("dtype")) if isinstance(v, dict) else None
        shape = v.get("shape") if isinstance(v, dict) else None
        offsets = v.get("data_offsets") if isinstance(v, dict) else None
        ok = st is not None and _ints(shape) and _ints(offsets) and len(offsets) == 2
        if ok:
            count = 1
            for d in shape:
                count *= d
            lo, hi = offsets
            ok = 0 <= lo <= hi <= data and hi - lo == count * st[1]
        if not ok:
            raise PackError(f"{path}: corrupt safetensors header (entry {key!r})")
        out[key] = (st[0], tuple(shape))
    return out


def _ints(v: Any) -> bool:
    return isinstance(v, list) and all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v
    )


def _line(exc: BaseException) -> str:
    text = str(exc).splitlines()
    return text[0] if text else type(exc).__name__


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
