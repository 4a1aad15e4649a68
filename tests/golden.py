"""Make the golden pack: a small fixed checkpoint and its pack, stored under packs/golden/.

Run from anywhere with `python -m tests.golden` (from the repository root) or
`python tests/golden.py`; it rewrites packs/golden/source.safetensors and packs/golden/pack.
`tests/test_golden.py` then proves that today's code still reads that pack and, packing the
stored source again with the manifest's config, produces the same tensors.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "packs" / "golden"
SOURCE = GOLDEN / "source.safetensors"
PACK = GOLDEN / "pack"
SEED = 20240607

# name -> (out, in, has bias). in=40 leaves a tail block of 8 at --block 16; --block-out 12 makes
# every output side a DCT block (12 is not a power of two), with tails of 8 (32 rows), 4 (64).
LINEARS = {
    "model.layers.0.attn.qkv": (48, 40, False),
    "model.layers.0.attn.o": (40, 48, True),
    "model.layers.0.mlp.up": (64, 32, True),
    "model.layers.0.mlp.down": (32, 64, True),
}
# Left out by the default selection: the embedding (2-D) and the norms.
EXCLUDED = [
    "model.embed_tokens.weight",
    "model.layers.0.input_layernorm.weight",
    "model.norm.weight",
]
# Relative to the repository root: the manifest records the path as given.
PACK_ARGS = [
    "pack",
    "packs/golden/source.safetensors",
    "--out",
    "packs/golden/pack",
    "--bits",
    "w4a8",
    "--block",
    "16",
    "--block-out",
    "12",
    "--layer-bits",
    r"mlp\.down=w8a8",
    "--layer-bits",
    r"attn\.o$=w8a8",
    "--seed",
    "7",
    "--force",
]
PRECISIONS = {
    "model.layers.0.attn.qkv": "w4a8",
    "model.layers.0.attn.o": "w8a8",
    "model.layers.0.mlp.up": "w4a8",
    "model.layers.0.mlp.down": "w8a8",
}


def source_state() -> dict[str, torch.Tensor]:
    """The golden checkpoint's tensors, from a fixed seed (float32)."""
    g = torch.Generator().manual_seed(SEED)
    state: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": torch.randn(100, 40, generator=g),
        "model.layers.0.input_layernorm.weight": 1 + 0.1 * torch.randn(40, generator=g),
        "model.norm.weight": 1 + 0.1 * torch.randn(32, generator=g),
    }
    for name, (out_f, in_f, bias) in LINEARS.items():
        w = torch.randn(out_f, in_f, generator=g) / in_f**0.5
        w[:, 3] *= 8  # an outlier input channel, what the transforms are for
        state[name + ".weight"] = w
        if bias:
            state[name + ".bias"] = 0.1 * torch.randn(out_f, generator=g)
    return state


def main() -> None:
    from duquant_cli.cli import app

    GOLDEN.mkdir(parents=True, exist_ok=True)
    save_file(source_state(), str(SOURCE), metadata={"golden_seed": str(SEED)})
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        app(PACK_ARGS, standalone_mode=False)
    finally:
        os.chdir(cwd)
    print(f"wrote {SOURCE.relative_to(ROOT)} and {PACK.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
