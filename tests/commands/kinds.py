"""Packs of every kind for the inspect / verify / stale tests, and tools to damage them.

Kinds: data-free (Hadamard, tails on both sides), calibrated (built from statistics: smoothed
in1, greedy rotations), mixed precision (`duquant pack --layer-bits`: w16a16, w8a8 and w3a8
layers, asymmetric groups), and static (data-free plus calibrated static activation scales).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from typer.testing import CliRunner

from duquant_cli.cli.app import app
from duquant_cli.commands.pack import pack
from duquant_cli.config import QuantConfig
from duquant_cli.formats.pack import MANIFEST, Pack, PackWriter
from duquant_cli.formats.stats import LayerStats, Stats
from duquant_cli.runtime.calibrate import calibrating, save_act_scales
from duquant_cli.runtime.loader import load_packed
from tests.helpers import small_state, write_safetensors

KINDS = ("data_free", "calibrated", "mixed", "static")
MIXED_BITS = ("attn=w16a16", "mlp\\.down=w8a8", "mlp\\.up=w3a8")


def run(*args: object):
    """The CLI as a user runs it; COLUMNS wide enough that no cell is cut."""
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "250"})


def small_stats(seed: int = 0) -> Stats:
    """Calibration statistics for small_state's layers, with one outlier input channel."""
    g = torch.Generator().manual_seed(seed)
    x24 = torch.randn(96, 24, generator=g)
    x24[:, 5] *= 40
    x40 = torch.randn(96, 40, generator=g)
    x40[:, 11] *= 40
    return Stats(
        {  # q_proj and up see the same input: one rows tensor, as collect_stats shares it
            "layers.0.attn.q_proj": LayerStats(x24.abs().amax(0), x24, 96),
            "layers.0.mlp.up": LayerStats(x24.abs().amax(0), x24, 96),
            "layers.0.mlp.down": LayerStats(x40.abs().amax(0), x40, 96),
        }
    )


def model_for(state: dict[str, torch.Tensor]) -> nn.Module:
    """A module tree with one nn.Linear per 2-D `.weight` of `state`, under the same names."""
    root = nn.Module()
    for key, w in state.items():
        if not key.endswith(".weight") or w.dim() != 2 or "norm" in key:
            continue
        *parents, leaf = key[: -len(".weight")].split(".")
        mod = root
        for p in parents:
            if not hasattr(mod, p):
                mod.add_module(p, nn.Module())
            mod = getattr(mod, p)
        bias = state.get(key[: -len(".weight")] + ".bias")
        lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
        with torch.no_grad():
            lin.weight.copy_(w)
            if bias is not None:
                lin.bias.copy_(bias)
        mod.add_module(leaf, lin)
    return root


def build(kind: str, root: Path) -> Path:
    """Write a pack of `kind` (and its checkpoint, root/ckpt.safetensors) under `root`."""
    state = small_state()
    ckpt = root / "ckpt.safetensors"
    if not ckpt.exists():
        write_safetensors(ckpt, state)
    out = root / kind
    if kind == "data_free":
        pack(ckpt, out, config=QuantConfig(block=16, block_out=12))
    elif kind == "calibrated":
        pack(ckpt, out, stats=small_stats())
    elif kind == "mixed":
        flags = [a for b in MIXED_BITS for a in ("--layer-bits", b)]
        res = run("pack", ckpt, "-o", out, "--weight-scheme", "asym", "--group-size", "8", *flags)
        assert res.exit_code == 0, res.output
    elif kind == "static":
        pack(ckpt, out, config=QuantConfig(block=16, block_out=12))
        model = model_for(state)
        load_packed(model, out, backend="dense")
        g = torch.Generator().manual_seed(1)
        with calibrating(model):
            for _ in range(2):
                x = torch.randn(8, 24, generator=g)
                block = model.get_submodule("layers.0")
                block.attn.q_proj(x)
                block.mlp.down(block.mlp.up(x))
        save_act_scales(model, out)
    else:
        raise ValueError(kind)
    return out


def rewrite(src: Path, dst: Path, edit: Callable[[str, dict[str, torch.Tensor]], None]) -> Path:
    """Copy a pack through PackWriter, letting `edit(name, tensors)` change tensors in place:
    a pack that is wrong inside but whose checksums are right."""
    old = Pack.open(src)
    with PackWriter(dst) as w:
        for e in old.layers.values():
            t = old.load(e.name)
            edit(e.name, t)
            w.add(
                e.name, t, shape=(e.out_features, e.in_features), precision=e.precision,
                transform=e.transform, quant=e.quant, source=e.source, info=e.info,
            )  # fmt: skip
        keep = ("format", "format_version", "files", "layers")
        w.commit({k: v for k, v in old.manifest.items() if k not in keep})
    return dst


def copy_pack(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_manifest(pack_dir: Path, edit: Callable[[dict], None]) -> None:
    path = pack_dir / MANIFEST
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=1))
