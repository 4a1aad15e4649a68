"""The fused CPU activation path: `prep.c`, built at first use with the system's C compiler.

Before its matmul, `DuQuantLinear.forward_rows` transforms and quantizes its input, and after
an int8 matmul it applies the token scale, the bias and the row restore. As torch ops that is
about ten passes over the activations before and four after, and on CPU they cost as much as
a quarter of nn.Linear's time at 64 tokens and more than half of it at 256 tokens with 16384
inputs, where the activations no longer fit in cache. `prep.c` does the same work one token
row at a time, with the row in cache from load to store (`Prep`, `Finish`; compiled graphs call
them through the layer's own forward, `layer.fused_rows`).

The C compiler is the one torch.compile needs on CPU too; no Python package is added. Where
there is none, or the build fails, or the built library fails its check, the layers run torch's
ops as before, and `status(model)` says which path each layer takes.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from duquant_cli.math.blocks import apply_blocks

log = logging.getLogger("duquant")

SOURCE = Path(__file__).with_name("prep.c")
# Native code for this CPU (AVX-512 where it has it); OpenMP shares torch's runtime (the same
# libgomp.so.1 soname, already loaded), so the rows split over torch's threads.
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-shared", "-fPIC", "-fopenmp")
# The float dtypes the C code reads and writes, as its IN_* / OUT_* codes; OUT_CODES: uint8.
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_OUT_CODES = 2
# Whether `library()` found a working library in this process (False until a layer is built):
# what compiled code reads, since torch.compile does not trace the loading. A plain module
# global, rather than torch._dynamo's constant-result marker, whose import costs a second.
AVAILABLE = False


class _Blocks(ctypes.Structure):
    _fields_ = (
        ("blocks", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("tail", ctypes.c_void_p),
        ("nb", ctypes.c_int64),
        ("b", ctypes.c_int64),
        ("t", ctypes.c_int64),
    )


class _Prep(ctypes.Structure):
    _fields_ = (
        ("x", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("scale", ctypes.c_void_p),
        ("perm", ctypes.c_void_p),
        ("in1", _Blocks),
        ("in2", _Blocks),
        ("rows", ctypes.c_int64),
        ("n", ctypes.c_int64),
        ("in_dtype", ctypes.c_int32),
        ("out_kind", ctypes.c_int32),
        ("clip_over_qmax", ctypes.c_float),
        ("qmax", ctypes.c_float),
        ("clamp", ctypes.c_int32),
    )


class _Finish(ctypes.Structure):
    _fields_ = (
        ("y", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("scale", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("restore", _Blocks),
        ("rows", ctypes.c_int64),
        ("n", ctypes.c_int64),
        ("out_kind", ctypes.c_int32),
    )


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "duquant" / "kernels"


def _cpu_flags() -> str:
    """The CPU's feature flags, so that a library built for one CPU is never loaded on
    another that shares the cache."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((ln for ln in lines if ln.startswith(("flags", "Features"))), "")


def _build(cc: str, out: Path, flags: tuple[str, ...]) -> bool:
    """Compile into a temporary file beside `out`, then move it in place: a concurrent build
    or load never sees half a library."""
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        run = subprocess.run(
            [cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=120
        )
        if run.returncode != 0:
            log.info("prep.c did not build with %s: %s", " ".join(flags), run.stderr.strip()[:500])
            return False
        os.replace(tmp, out)
        return True
    except (OSError, subprocess.SubprocessError) as e:  # an unwritable cache, a hung compiler
        log.info("prep.c did not build: %s", e)
        return False
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built library, or None (the layers then run torch's ops): built once per machine
    into `cache_dir()`, loaded once per process, and checked against torch's ops first."""
    # Linux, and torch's threads OpenMP's (which the C code shares)
    if platform.system() != "Linux" or not torch.backends.openmp.is_available():
        return None
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        log.info("no C compiler: DuQuant layers run torch's ops for their activations")
        return None
    source, cpu = SOURCE.read_text(), _cpu_flags()
    for flags in (FLAGS, FLAGS[:-1]):  # without OpenMP where the compiler has none
        key = hashlib.sha256("\n".join((source, cc, *flags, cpu)).encode()).hexdigest()[:16]
        path = cache_dir() / f"prep-{key}.so"
        if path.exists() or _build(cc, path, flags):
            break
    else:
        log.warning("prep.c did not build: DuQuant layers run torch's ops for their activations")
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        log.warning("prep library did not load (%s): DuQuant layers run torch's ops", e)
        return None
    lib.duquant_prep.argtypes = (ctypes.POINTER(_Prep),)
    lib.duquant_finish.argtypes = (ctypes.POINTER(_Finish),)
    lib.duquant_prep.restype = lib.duquant_finish.restype = ctypes.c_int
    if not _agrees(lib):
        log.warning("prep library disagrees with torch's ops: not used")
        return None
    global AVAILABLE
    AVAILABLE = True
    return lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _blocks(
    blocks: torch.Tensor | None, tail: torch.Tensor | None, scales: torch.Tensor | None
) -> _Blocks:
    if blocks is None:
        return _Blocks()
    nb, b, _ = blocks.shape
    t = 0 if tail is None else tail.shape[0]
    return _Blocks(_ptr(blocks), _ptr(scales), _ptr(tail), nb, b, t)


def _cpu_floats(*tensors: torch.Tensor | None) -> bool:
    """Whether every tensor given is as the C code reads it: contiguous float32 on the CPU."""
    return all(
        t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu"
        for t in tensors
        if t is not None
    )


@dataclass(frozen=True)
class Prep:
    """One layer's fused activation path: x [T, n] -> (activations for its matmul, per-token
    scale). Dense: the quantized activations scaled back, in the weight's dtype (scale None).
    Codes: uint8 codes + 128 and the float32 scale [T, 1], for oneDNN's int8 matmul.

    Holds the tensors its arguments point into, so they live as long as it does."""

    args: _Prep
    keep: tuple[torch.Tensor, ...]
    out_dtype: torch.dtype
    fn: object

    @classmethod
    def of(
        cls,
        n: int,
        perm: torch.Tensor | None,
        in1: torch.Tensor | None,
        in1_tail: torch.Tensor | None,
        in1_scales: torch.Tensor | None,
        in2: torch.Tensor | None,
        in2_tail: torch.Tensor | None,
        in2_scales: torch.Tensor | None,
        a_bits: int,
        clip: float,
        out_dtype: torch.dtype,
    ) -> Prep | None:
        """Each transform's blocks, tail and row scales (or None).
        `out_dtype` uint8 for codes. None where the library is missing or a tensor is not as
        the C code reads it (contiguous float32 on the CPU; perm int64)."""
        lib = library()
        if lib is None or (out_dtype not in DTYPES and out_dtype != torch.uint8):
            return None
        in1_args, in2_args = (in1, in1_tail, in1_scales), (in2, in2_tail, in2_scales)
        floats = [t for t in (*in1_args, *in2_args) if t is not None]
        if not _cpu_floats(*floats) or (perm is not None and perm.device.type != "cpu"):
            return None
        if perm is not None and (perm.dtype != torch.int64 or not perm.is_contiguous()):
            return None
        qmax = (1 << (a_bits - 1)) - 1
        codes = out_dtype == torch.uint8
        if codes and a_bits > 8:
            return None
        args = _Prep(
            perm=_ptr(perm),
            in1=_blocks(*in1_args),
            in2=_blocks(*in2_args),
            n=n,
            out_kind=_OUT_CODES if codes else DTYPES[out_dtype],
            clip_over_qmax=clip / qmax,
            qmax=qmax,
            clamp=int(clip < 1.0),
        )
        keep = tuple(floats) + (() if perm is None else (perm,))
        return cls(args, keep, out_dtype, lib.duquant_prep)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [T, n] float32 or bfloat16 on the CPU, without autograd (the caller checks)."""
        x = x.contiguous()
        t = x.shape[0]
        out = torch.empty(t, self.args.n, dtype=self.out_dtype)
        scale = torch.empty(t, 1) if self.out_dtype == torch.uint8 else None
        a = _Prep.from_buffer_copy(self.args)  # a copy per call: layers may run on two threads
        a.x, a.out, a.rows, a.in_dtype = x.data_ptr(), out.data_ptr(), t, DTYPES[x.dtype]
        if scale is not None:
            a.scale = scale.data_ptr()
        if self.fn(ctypes.byref(a)):
            raise MemoryError("prep: no memory for a row buffer")
        return out, scale


@dataclass(frozen=True)
class Finish:
    """One int8 layer's fused tail: y [T, out] float32 (its matmul's, weight scale applied) and
    the per-token scale -> (y * scale + bias) @ blockdiag(restore) in float32 or bfloat16."""

    args: _Finish
    keep: tuple[torch.Tensor, ...]
    fn: object

    @classmethod
    def of(
        cls,
        n: int,
        bias: torch.Tensor | None,
        restore: torch.Tensor | None,
        restore_tail: torch.Tensor | None,
        restore_scales: torch.Tensor | None,
    ) -> Finish | None:
        """The bias, the restore's blocks, tail and row scales
        (or None). None where the library is missing or a tensor is not as the C code reads it."""
        lib = library()
        tensors = (bias, restore, restore_tail, restore_scales)
        if lib is None or not _cpu_floats(*tensors):
            return None
        args = _Finish(bias=_ptr(bias), restore=_blocks(restore, restore_tail, restore_scales), n=n)
        keep = tuple(t for t in tensors if t is not None)
        return cls(args, keep, lib.duquant_finish)

    def __call__(self, y: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """y contiguous, `dtype` float32 or bfloat16, without autograd (the caller checks)."""
        out = torch.empty(y.shape, dtype=dtype)
        a = _Finish.from_buffer_copy(self.args)
        a.y, a.out, a.scale, a.rows = y.data_ptr(), out.data_ptr(), scale.data_ptr(), y.shape[0]
        a.out_kind = DTYPES[dtype]
        if self.fn(ctypes.byref(a)):
            raise MemoryError("prep: no memory for a row buffer")
        return out


def _agrees(lib: ctypes.CDLL) -> bool:
    """The library on a case whose block products are exact in any summation order (dyadic
    inputs, signed Hadamard blocks): a first transform one matrix up to row scales and a
    second of distinct blocks, both with a tail, the permutation between them, over enough
    blocks for the vector path and the plain one; then the int8 tail. Codes, scales and
    outputs equal to torch's, bit for bit."""
    gen = torch.Generator().manual_seed(0)
    rows, nb, n = 3, 9, 9 * 16 + 4
    x = torch.randint(-8, 9, (rows, n), generator=gen).float() / 2
    had = torch.ones(1, 1)
    while had.shape[0] < 16:
        had = torch.cat([torch.cat([had, had], 1), torch.cat([had, -had], 1)])
    signs = torch.randint(0, 2, (nb, 16, 1), generator=gen).float() * 2 - 1
    shared, distinct = (had / 4).expand(nb, 16, 16), (had / 4) * signs
    scales = (2.0 ** torch.randint(-2, 3, (nb, 16), generator=gen)).float()
    tail = torch.eye(4) / 2
    perm = torch.randperm(n, generator=gen)
    h = apply_blocks(x * torch.cat([scales.view(-1), torch.ones(4)]), shared, tail)
    h = apply_blocks(h[:, perm], distinct, tail)
    scale = torch.maximum(h.amax(1, keepdim=True), -h.amin(1, keepdim=True)).mul_(1 / 127)
    want = torch.div(h, scale).round_().add_(128).to(torch.uint8)
    shared = shared.contiguous()
    args = _Prep(
        perm=perm.data_ptr(),
        in1=_blocks(shared, tail, scales),
        in2=_blocks(distinct, tail, None),
        n=n,
        out_kind=_OUT_CODES,
        clip_over_qmax=1 / 127,
        qmax=127,
    )
    got, got_scale = torch.empty(rows, n, dtype=torch.uint8), torch.empty(rows, 1)
    args.x, args.out, args.scale, args.rows = _ptr(x), _ptr(got), _ptr(got_scale), rows
    if lib.duquant_prep(ctypes.byref(args)) or not (
        torch.equal(got, want) and torch.equal(got_scale, scale)
    ):
        return False
    # The int8 tail: y * scale + bias, the restore (distinct blocks and a tail), bfloat16.
    bias = torch.randint(-8, 9, (n,), generator=gen).float() / 4
    tok = (2.0 ** torch.randint(-3, 3, (rows, 1), generator=gen)).float()
    want = apply_blocks(x * tok + bias, distinct, tail).to(torch.bfloat16)
    fin = _Finish(
        bias=_ptr(bias), restore=_blocks(distinct, tail, None), n=n, out_kind=DTYPES[torch.bfloat16]
    )
    got = torch.empty(rows, n, dtype=torch.bfloat16)
    fin.y, fin.out, fin.scale, fin.rows = _ptr(x), _ptr(got), _ptr(tok), rows
    return lib.duquant_finish(ctypes.byref(fin)) == 0 and torch.equal(got, want)
