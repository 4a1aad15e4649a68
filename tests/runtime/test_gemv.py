"""The int8 matmul at one to four tokens (`runtime/gemv.py`, `duquant_gemv` in prep.c): oneDNN's
results bit for bit on its own prepacked weight, in the layers eagerly and compiled; oneDNN's
kernel wherever the layout check or the kernel says no."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from duquant_cli.runtime import backends, gemv
from duquant_cli.runtime import layer as layer_mod
from duquant_cli.runtime.backends import _onednn_qlinear
from duquant_cli.runtime.gemv import GEMV_ROWS, Gemv, note_layout
from duquant_cli.runtime.loader import load_packed
from tests.runtime.util import LINEARS, TinyNet, clone_model, make_pack

pytestmark = pytest.mark.skipif(not gemv._kernel_ok(), reason="no C compiler or no AVX-512 VNNI")
DIMS = (136, 272, 24)  # 136 and 24: neither a multiple of oneDNN's 64-wide blocks


def _packed(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    return w, torch.ops.onednn.qlinear_prepack(w, None)


@pytest.mark.parametrize(("n", "k"), [(64, 128), (80, 40), (24, 136), (576, 1536), (130, 3)])
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5, 9])
def test_gemv_is_onednn_bit_for_bit(n: int, k: int, tokens: int) -> None:
    """Extreme codes too (all 255 against all -128): exact int32 sums, one float32 product."""
    w, packed = _packed(n, k)
    note_layout(w, packed)
    few = Gemv.of(packed, scale := torch.rand(n) / 8)
    assert few is not None
    u = torch.randint(0, 256, (tokens, k), dtype=torch.uint8)
    u[0] = 255
    got, want = few(u), _onednn_qlinear(u, packed, scale)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    exact = ((u.double() - 128) @ w.double().t()).float() * scale
    assert torch.equal(got, exact)


def test_a_layout_that_does_not_match_is_not_read() -> None:
    """A buffer holding other codes than the weight's fails the check: no `Gemv` for the
    shape. A constant weight tells nothing: the next weight of the shape decides."""
    n, k = 72, 200
    w, _ = _packed(n, k, seed=1)
    _, other = _packed(n, k, seed=2)
    note_layout(torch.zeros(n, k, dtype=torch.int8), other)
    assert (n, k) not in gemv._LAYOUTS
    note_layout(w, other)
    assert gemv._LAYOUTS[(n, k)] is False
    assert Gemv.of(other, torch.ones(n)) is None


def test_a_scale_it_cannot_read_is_refused() -> None:
    w, packed = _packed(64, 64)
    note_layout(w, packed)
    assert Gemv.of(packed, torch.ones(64)) is not None
    assert Gemv.of(packed, torch.ones(64, dtype=torch.float64)) is None
    assert Gemv.of(packed, torch.ones(32)) is None


def test_inputs_whose_sums_could_overflow_are_left_to_onednn() -> None:
    """Past 65793 inputs, 255 x 128 per input no longer fits the int32 sums."""
    for k, runs in ((65793, True), (65794, False)):
        w, packed = _packed(1, k)
        note_layout(w, packed)
        assert (Gemv.of(packed, torch.ones(1)) is not None) is runs


def _model(tmp_path: Path, dtype: torch.dtype) -> TinyNet:
    base = TinyNet(dims=DIMS)
    model = clone_model(base, dims=DIMS).to(dtype)
    load_packed(model, make_pack(tmp_path, base), backend="int8")
    return model


@pytest.fixture
def calls(monkeypatch) -> list[int]:
    """The token counts `Gemv` is called with."""
    seen: list[int] = []
    run = Gemv.__call__

    def counted(self: Gemv, u: torch.Tensor) -> torch.Tensor:
        seen.append(u.shape[0])
        return run(self, u)

    monkeypatch.setattr(Gemv, "__call__", counted)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layers_run_it_at_few_tokens_with_onednn_bits(
    tmp_path: Path, dtype, monkeypatch, calls
) -> None:
    """1-4 tokens through `Gemv`, five and more through oneDNN's kernel; the outputs those of
    oneDNN's kernel at every count, also after `model.to` packs the weights again."""
    model = _model(tmp_path, dtype)
    for step in ("loaded", "moved"):
        if step == "moved":
            model.to(dtype)
        for tokens in (1, 4, 5):
            x = torch.randn(tokens, DIMS[0]).to(dtype)
            calls.clear()
            with torch.no_grad():
                got = model(x)
                assert len(calls) == (len(LINEARS) if tokens <= GEMV_ROWS else 0)
                monkeypatch.setattr(layer_mod, "GEMV_ROWS", 0)
                want = model(x)
                monkeypatch.setattr(layer_mod, "GEMV_ROWS", GEMV_ROWS)
            assert torch.equal(got, want)


def test_without_a_matching_layout_layers_run_onednn(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(gemv, "_LAYOUTS", {})
    monkeypatch.setattr(backends, "note_layout", lambda w, p: None)
    model = _model(tmp_path, torch.float32)
    for name in LINEARS:
        assert model.get_submodule(name)._row_plan(False).gemv is None
    with torch.no_grad():
        assert model(torch.randn(1, DIMS[0])).isfinite().all()


def test_compiled_layers_run_it_with_the_same_bits(tmp_path: Path, calls) -> None:
    """Compiled, each layer runs its eager forward: `Gemv` at 1-4 tokens, with eager's bits."""
    torch._dynamo.reset()
    model = _model(tmp_path, torch.bfloat16)  # (float32: inductor's GELU may differ by an ulp)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for tokens in (1, 4, 6):
            x = torch.randn(tokens, DIMS[0]).bfloat16()
            calls.clear()
            assert torch.equal(compiled(x), model(x))
            assert len(calls) == (2 * len(LINEARS) if tokens <= GEMV_ROWS else 0)
