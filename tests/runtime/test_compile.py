"""`torch.compile(fullgraph=True)` traces DuQuant layers whole and matches eager."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from duquant_cli.config import Precision, Scheme
from duquant_cli.runtime.calibrate import calibrating
from duquant_cli.runtime.loader import load_packed
from tests.helpers import rel_err
from tests.runtime.util import W16A16, make_pack

pytestmark = pytest.mark.slow

CONFIGS = {
    "w4a8": {},
    "w4a8_asym_act": {"act_scheme": Scheme.ASYM, "act_clip": 0.9},
    "w4a8_static": {},
    "w16a16": {"precision": W16A16},
    "w8a8_tails": {"precision": Precision(8, 8), "block": 12},  # 40 = 3 x 12 + a tail of 4
}


class Many(nn.Module):
    """One linear layer per configuration, each fed the same input."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.nets = nn.ModuleDict({k: nn.Sequential(nn.Linear(40, 24)) for k in CONFIGS})
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([net(x) for net in self.nets.values()])


def test_compile_fullgraph_matches_eager(tmp_path: Path) -> None:
    torch._dynamo.reset()
    base = Many()
    model = Many()
    model.load_state_dict(base.state_dict())
    for key, cfg in CONFIGS.items():
        net = base.nets[key]
        load_packed(model.nets[key], make_pack(tmp_path, net, name=key, **cfg), backend="dense")
    x = torch.randn(2, 9, 40, generator=torch.Generator().manual_seed(3))
    with calibrating(model.nets["w4a8_static"]), torch.no_grad():
        model.nets["w4a8_static"](x)
    assert model.nets["w4a8_static"][0].act_mode == "static"
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)
        got = compiled(x)
    for i, key in enumerate(CONFIGS):
        # same math; a rounding step may flip where inductor reorders float ops
        assert rel_err(got[i], eager[i]) < 1e-3, key
    with torch.no_grad():
        assert rel_err(eager[3], base.nets["w16a16"](x)) < 1e-5
