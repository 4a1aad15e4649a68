"""`torch.compile(fullgraph=True)` traces DuQuant layers whole and matches eager."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from duquant_cli.config import Precision, Rotation, RowRot, Scheme
from duquant_cli.runtime.backends import KERNELS, Backend
from duquant_cli.runtime.calibrate import calibrating
from duquant_cli.runtime.layer import DuQuantLinear
from duquant_cli.runtime.loader import load_packed
from tests.helpers import rel_err
from tests.runtime.util import LINEARS, W16A16, TinyNet, clone_model, make_pack, tiny_stats

ROWS_CASES = {
    "w4a8": {},
    "w4a8-asym-act-clip": {"act_scheme": Scheme.ASYM, "act_clip": 0.9},
    "w8a8-propagate": {"precision": Precision(8, 8), "row_rot": RowRot.PROPAGATE},
    "w4a8-off-noperm": {"row_rot": RowRot.OFF, "permute": False},
    "w16a16": {"precision": W16A16},
    "w16a16-calibrated": {"precision": W16A16, "calibrated": True, "rotation": Rotation.GREEDY},
    "w4a8-calibrated": {"calibrated": True, "rotation": Rotation.GREEDY},
}

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


@pytest.mark.parametrize("dims", [(40, 56, 24), (32, 64, 16)], ids=["tails", "full-blocks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", list(ROWS_CASES), ids=list(ROWS_CASES))
def test_compiled_form_computes_the_eager_forward(
    tmp_path: Path, case: str, dtype: torch.dtype, dims
) -> None:
    """`forward_rows`, the row-major form torch.compile traces for the dense backend, called
    eagerly: what the channels-major forward computes, for every transform, tail, row mode and
    activation mode."""
    cfg = dict(ROWS_CASES[case])
    base = TinyNet(dims=dims)
    stats = tiny_stats(base) if cfg.get("calibrated") else None
    out = make_pack(tmp_path, base, stats=stats, **cfg)
    model = clone_model(base, dims=dims).to(dtype)
    load_packed(model, out, backend="dense")
    # 64 tokens run the matmul weight-first, 5 in nn.Linear's order (`rows_weight_first`)
    x = torch.randn(64, dims[0], generator=torch.Generator().manual_seed(2)).to(dtype)
    unquantized = cfg.get("precision") == W16A16
    tol = (1e-6 if unquantized else 2e-3) if dtype == torch.float32 else 2e-2
    for name in LINEARS:
        layer = model.get_submodule(name)
        assert isinstance(layer, DuQuantLinear)
        v = x if layer.in_features == dims[0] else torch.randn(5, layer.in_features).to(dtype)
        with torch.no_grad():
            eager, rows = layer(v), layer.forward_rows(v)
        assert rows.dtype == eager.dtype and rows.shape == eager.shape and rows.is_contiguous()
        # quantized: a rounding flip where float ops are reordered apart, the same numbers
        assert rel_err(rows.float(), eager.float()) < tol, name


def test_compiled_graph_has_no_batched_matmul(tmp_path: Path, torch_prep) -> None:
    """Under torch.compile, without the fused C code, the dense layer traces its fusable form:
    the block transforms and the restore as products summed per block (no bmm), the matmul the
    only matrix product."""
    torch._dynamo.reset()
    base = TinyNet(dims=(32, 64, 16))
    model = clone_model(base, dims=(32, 64, 16))
    load_packed(model, make_pack(tmp_path, base), backend="dense")
    model.proj.use_kernel(KERNELS[Backend.DENSE])  # torch's mm (oneDNN's is one opaque op)
    graphs = []

    def capture(gm, inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        torch.compile(model.proj, backend=capture, fullgraph=True)(torch.randn(6, 32))
    targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert not [t for t in targets if "bmm" in t], targets
    assert sum("mm" in t for t in targets) == 1, targets
