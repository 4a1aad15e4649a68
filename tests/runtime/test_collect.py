"""collect_stats: any module, any batch shape, bounded rows, shared inputs stored once."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from duquant_cli.errors import ConfigError
from duquant_cli.runtime.collect import collect_stats


class Attn(nn.Module):
    """Three projections of one input (like q/k/v) and one of another."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 4)
        self.o = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        h = torch.cat([self.q(x), self.k(x), self.v(x)], -1) * scale
        return self.o(h)


def _batches(n: int, tokens: int = 5, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, tokens, 8, generator=g) for _ in range(n)]


def test_amax_is_exact_and_rows_are_real_input_rows() -> None:
    model = Attn()
    batches = _batches(3)
    stats = collect_stats(model, batches)
    allx = torch.cat([b.reshape(-1, 8) for b in batches])
    torch.testing.assert_close(stats["q"].amax, allx.abs().amax(0))
    assert stats["q"].tokens == 30 and stats["q"].rows.shape == (30, 8)
    # every kept row is one of the input rows (float16 storage)
    diff = (stats["q"].rows.float()[:, None] - allx.half().float()[None]).abs().amax(-1)
    assert bool((diff.amin(1) == 0).all())
    assert stats["o"].rows.shape == (30, 16)


def test_rows_are_bounded_by_max_rows_not_by_batches() -> None:
    stats = collect_stats(Attn(), _batches(40), max_rows=16)
    for s in stats.layers.values():
        assert s.rows.shape[0] == 16
        assert s.tokens == 400
    # a uniform sample: rows come from all over the run, not just the first or last batches
    allx = torch.cat([b.reshape(-1, 8) for b in _batches(40)]).half().float()
    where = [(allx == r.float()).all(1).nonzero()[0, 0].item() // 10 for r in stats["q"].rows]
    assert max(where) - min(where) > 10


def test_layers_fed_one_tensor_share_their_rows() -> None:
    stats = collect_stats(Attn(), _batches(4), max_rows=12)
    assert stats["q"].rows is stats["k"].rows is stats["v"].rows
    assert stats["o"].rows is not stats["q"].rows
    # shared across batches even once the sample overflows
    assert stats["q"].rows.shape[0] == 12


def test_batch_kinds_tensor_dict_tuple() -> None:
    batches = _batches(3)
    model = Attn()
    ref = collect_stats(model, batches)
    as_dict = collect_stats(model, [{"x": b, "scale": 2.0} for b in batches])
    as_tuple = collect_stats(model, [(b, 2.0) for b in batches])
    torch.testing.assert_close(as_dict["q"].amax, ref["q"].amax)
    torch.testing.assert_close(as_tuple["o"].amax, as_dict["o"].amax)
    torch.testing.assert_close(as_dict["o"].amax, ref["o"].amax * 2)


def test_chosen_layers_only_and_hooks_removed() -> None:
    model = Attn()
    stats = collect_stats(model, _batches(2), layers=["o"])
    assert list(stats.layers) == ["o"]
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_hooks_removed_when_the_model_raises() -> None:
    model = Attn()
    with pytest.raises(RuntimeError):
        collect_stats(model, [torch.randn(2, 3)])  # wrong width
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_large_activations_are_kept_in_float32() -> None:
    b = _batches(1)[0]
    b[0, 0, 3] = 1e5  # beyond float16
    stats = collect_stats(Attn(), [b])
    assert stats["q"].rows.dtype == torch.float32
    assert float(stats["q"].rows.abs().max()) == 1e5
    assert stats["o"].rows.dtype == torch.float16


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layers": ["nope"]}, "nope: no nn.Linear of that name in Attn"),
        ({"layers": []}, "no layers chosen"),
        ({"max_rows": 0}, "max_rows must be at least 1"),
    ],
)
def test_bad_arguments(kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message):
        collect_stats(Attn(), _batches(1), **kwargs)


def test_no_batches_or_no_linear() -> None:
    with pytest.raises(ConfigError, match="no calibration batches"):
        collect_stats(Attn(), [])
    with pytest.raises(ConfigError, match=r"has no nn\.Linear"):
        collect_stats(nn.ReLU(), [torch.zeros(1)])
