"""The int8 matmul at one to four tokens, in `prep.c`, on the weight oneDNN prepacked.

oneDNN's int8 matmul pays about 20 us a call before it reads anything, and at one token reads
its weight at about half the speed the memory allows: on an EPYC, one token through a 2048x2048
int8 weight took it 58-96 us, where `duquant_gemv` takes 25-32 us, and 2048x16384 650-1200 us
against 320-560 us. From five tokens on oneDNN's kernel is the faster one. `duquant_gemv` reads
oneDNN's own buffer, so the layer keeps one copy of its weight. That layout is oneDNN's choice:
it is checked on the first weight of each shape oneDNN packs (`note_layout`), and the kernel once
per process against the exact results, before any layer uses it. Its results are oneDNN's, bit
for bit: exact int32 sums, then one float32 product by the weight scale.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from dataclasses import dataclass

import torch

from duquant_cli.runtime.prep import library

log = logging.getLogger("duquant")

GEMV_ROWS = 4  # the most tokens `Gemv` takes (its C kernel shares a weight read among them)
_BLOCK_OUT, _BLOCK_IN = 64, 64  # oneDNN's output block, and what the inputs are padded to


class _Gemv(ctypes.Structure):
    _fields_ = (
        ("u", ctypes.c_void_p),
        ("w", ctypes.c_void_p),
        ("scale", ctypes.c_void_p),
        ("y", ctypes.c_void_p),
        ("rows", ctypes.c_int64),
        ("n", ctypes.c_int64),
        ("k", ctypes.c_int64),
        ("kp", ctypes.c_int64),
    )


def _padded(size: int, block: int) -> int:
    return -(-size // block) * block


def _sizes(n: int, k: int) -> tuple[int, int, int]:
    """(padded outputs, padded inputs, bytes) of oneDNN's buffer for an [n, k] int8 weight:
    the padded weight, then an int32 compensation per padded output."""
    np_, kp = _padded(n, _BLOCK_OUT), _padded(k, _BLOCK_IN)
    return np_, kp, np_ * (kp + 4)


def _buffer(weight: torch.Tensor) -> tuple[int, int] | None:
    """(address, bytes) of a oneDNN prepacked tensor; None where this torch cannot say."""
    try:
        return torch.ops.mkldnn.data_ptr(weight), torch.ops.mkldnn._nbytes(weight)
    except (AttributeError, RuntimeError):
        return None


def _call(fn, weight: int, scale: torch.Tensor, u: torch.Tensor, n: int, kp: int) -> torch.Tensor:
    y = torch.empty(u.shape[0], n)
    args = _Gemv(
        u.data_ptr(), weight, scale.data_ptr(), y.data_ptr(), u.shape[0], n, u.shape[1], kp
    )
    if fn(ctypes.byref(args)):
        raise RuntimeError("duquant_gemv: not built for this CPU")
    return y


# (out, in) -> whether oneDNN prepacks int8 weights of that shape as `duquant_gemv` reads
# them (`note_layout`): found on the first weight of each shape that oneDNN packs.
_LAYOUTS: dict[tuple[int, int], bool] = {}


def note_layout(weight: torch.Tensor, packed: torch.Tensor) -> None:
    """Record whether `packed` (oneDNN's prepacked copy of the int8 [out, in] `weight`) holds
    every byte where `duquant_gemv` expects it, and the compensation after it: once per shape,
    on the first weight that tells (not constant), at the cost of one comparison."""
    n, k = weight.shape
    if (n, k) in _LAYOUTS or weight.device.type != "cpu" or weight.min() == weight.max():
        return
    where = _buffer(packed)
    np_, kp, nbytes = _sizes(n, k)
    if where is None or where[1] != nbytes:
        _LAYOUTS[(n, k)] = False
        return
    got = torch.frombuffer((ctypes.c_int8 * where[1]).from_address(where[0]), dtype=torch.int8)
    want = torch.zeros(np_, kp, dtype=torch.int8)
    want[:n, :k] = weight
    want = want.view(np_ // _BLOCK_OUT, _BLOCK_OUT, kp // 4, 4).transpose(1, 2).reshape(-1)
    comp = got[np_ * kp :].view(torch.int32)[:n]
    same = torch.equal(got[: np_ * kp], want)
    _LAYOUTS[(n, k)] = same and torch.equal(comp, -weight.sum(1, dtype=torch.int32))
    if not _LAYOUTS[(n, k)]:
        log.info("oneDNN packs %dx%d int8 weights otherwise: its kernel runs them", n, k)


@functools.cache
def _kernel_ok() -> bool:
    """`duquant_gemv` on one to five tokens (both tiles, both tails) of a random 100x203 weight
    gives the exact results, bit for bit: once per process."""
    lib = library()
    if lib is None or not lib.duquant_has_gemv() or not torch.backends.mkldnn.is_available():
        return False
    gen = torch.Generator().manual_seed(0)
    n, k = 100, 203
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    try:
        packed = torch.ops.onednn.qlinear_prepack(w, None)
    except RuntimeError:
        return False
    note_layout(w, packed)
    if not _LAYOUTS.get((n, k)):
        return False
    u = torch.randint(0, 256, (GEMV_ROWS + 1, k), dtype=torch.uint8, generator=gen)
    scale = torch.rand(n, generator=gen) / 64
    exact = (u.double() - 128) @ w.double().t()  # exact: |sums| < 2^53
    y = _call(lib.duquant_gemv, _buffer(packed)[0], scale, u, n, _sizes(n, k)[1])
    if not torch.equal(y, exact.float() * scale):
        log.warning("duquant_gemv disagrees with the exact int8 matmul: not used")
        return False
    return True


@dataclass(frozen=True)
class Gemv:
    """One int8 layer's matmul at one to `GEMV_ROWS` tokens: uint8 codes + 128 [T, in] ->
    ((u - 128) W^T) * weight_scale [T, out] float32, as `_onednn_qlinear`'s. Holds the prepacked
    weight and the scale, so that the buffer it reads lives as long as it does."""

    weight: torch.Tensor
    scale: torch.Tensor
    address: int
    n: int
    kp: int
    fn: object

    @classmethod
    def of(cls, weight: torch.Tensor, scale: torch.Tensor) -> Gemv | None:
        """For a weight from `torch.ops.onednn.qlinear_prepack` ([in, out] as torch sees it) and
        its float32 scale [out]; None where the kernel or the layout check says no."""
        k, n = weight.shape
        if k * 255 * 128 >= 2**31:  # its int32 sums of (codes + 128) x codes could overflow
            return None
        scale = scale.reshape(-1)
        if scale.dtype != torch.float32 or not scale.is_contiguous() or scale.numel() != n:
            return None
        if weight.layout != torch._mkldnn or weight.dtype != torch.int8:
            return None
        if not _LAYOUTS.get((n, k)) or not _kernel_ok():
            return None
        where = _buffer(weight)
        _, kp, nbytes = _sizes(n, k)
        if where is None or where[1] != nbytes:
            return None
        return cls(weight, scale, where[0], n, kp, library().duquant_gemv)

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        """u uint8 [T, in], T <= GEMV_ROWS (more runs, but slower than oneDNN's kernel)."""
        return _call(self.fn, self.address, self.scale, u.contiguous(), self.n, self.kp)
