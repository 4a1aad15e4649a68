"""Small models and packs for the runtime tests, plus references written from the pack docs."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from duquant_cli.commands.pack import pack
from duquant_cli.config import Precision, QuantConfig
from duquant_cli.formats.selection import Selection
from duquant_cli.formats.stats import LayerStats, Stats
from duquant_cli.math.quantize import fake_quant_per_token, fake_quant_static
from duquant_cli.runtime.layer import DuQuantLinear
from tests.helpers import dense, reference_dequant, write_safetensors

W16A16 = Precision(16, 16)


class TinyNet(nn.Module):
    """Linear layers with tails at block 16 (40, 56, 24 are not multiples of 16), with and
    without bias, nested names, and non-linear ops between them."""

    def __init__(self, seed: int = 0, dims: tuple[int, int, int] = (40, 56, 24)) -> None:
        super().__init__()
        d, h, o = dims
        g = torch.Generator().manual_seed(seed)
        block = nn.ModuleDict({"up": nn.Linear(d, h), "down": nn.Linear(h, d, bias=False)})
        self.blocks = nn.ModuleList([block])
        self.proj = nn.Linear(d, o)
        self.act = nn.GELU()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
            self.blocks[0]["up"].weight[:, 3] *= 8  # an outlier input channel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[0]
        x = x + blk["down"](self.act(blk["up"](x)))
        return self.proj(x)


LINEARS = ["blocks.0.up", "blocks.0.down", "proj"]


def save_model(model: nn.Module, path: Path) -> Path:
    return write_safetensors(path, {k: v.detach() for k, v in model.state_dict().items()})


def make_pack(tmp: Path, model: nn.Module, name: str = "pack", stats=None, **cfg) -> Path:
    """Pack `model`'s linear layers (checkpoint written under tmp) with QuantConfig(**cfg), and
    activation statistics when given (an activation-aware pack)."""
    ckpt = save_model(model, tmp / f"{name}.safetensors")
    out = tmp / name
    config = QuantConfig(**({"block": 16} | cfg))
    sel = Selection(default_exclude=False)
    pack(ckpt, out, config=config, selection=sel, force=True, stats=stats)
    return out


def tiny_stats(model: TinyNet, rows: int = 64, seed: int = 0) -> Stats:
    """Each linear layer's real inputs for a batch of Gaussian rows with an outlier channel."""
    x = torch.randn(rows, model.proj.in_features, generator=torch.Generator().manual_seed(seed))
    x[:, 7] *= 30
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda m, args, n=n: seen.__setitem__(n, args[0].detach())
        )
        for n in LINEARS
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return Stats({n: LayerStats(t.abs().amax(0), t, rows) for n, t in seen.items()})


def clone_model(model: nn.Module, **kw) -> nn.Module:
    """A fresh model of the same class with the same weights."""
    m = type(model)(**kw)
    m.load_state_dict(model.state_dict())
    return m


def snapshot(model: nn.Module) -> tuple[dict[str, type], dict[str, torch.Tensor]]:
    """Module types by name and a copy of the state dict: 'untouched' means both unchanged."""
    types = {n: type(m) for n, m in model.named_modules()}
    return types, {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model: nn.Module, snap) -> None:
    types, state = snap
    assert {n: type(m) for n, m in model.named_modules()} == types
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), k


def reference_layer(
    x: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    layer: DuQuantLinear,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """The pack-format equation with dense block-diagonal matrices and math's fake quantizers,
    in float64 where no quantizer runs (so the reference itself is exact)."""
    x = x.double()
    if (m := dense(tensors, "in1")) is not None:
        x = x @ m.double()
    if "perm" in tensors:
        x = x[..., tensors["perm"]]
    if (m := dense(tensors, "in2")) is not None:
        x = x @ m.double()
    if layer.act_mode == "dynamic":
        x = fake_quant_per_token(x.float(), layer.a_bits, layer.act_asym, layer.act_clip).double()
    elif layer.act_mode == "static":
        x = fake_quant_static(x.float(), layer.act_scale.float(), layer.a_bits).double()
    w = reference_dequant(tensors, layer.w_bits, layer.in_features).double()
    y = x @ w.mT
    if layer.row_rot == "restore" and (m := dense(tensors, "out")) is not None:
        y = y @ m.double()
    if "bias" in tensors:
        y = y + tensors["bias"].double()
    elif bias is not None:
        y = y + bias.double()
    return y
