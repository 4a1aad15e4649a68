"""Disk snapshots for the hardening tests: "nothing written" means the same names and bytes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from duquant_cli.formats.pack import MANIFEST


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` (folders as None, files with their bytes), relative names."""
    out: dict[str, bytes | None] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = None if p.is_dir() else p.read_bytes()
    return out


def diff(before: dict[str, bytes | None], after: dict[str, bytes | None]) -> list[str]:
    """Paths added, removed or changed: empty when the disk is unchanged."""
    keys = before.keys() | after.keys()
    return sorted(k for k in keys if before.get(k, b"?") != after.get(k, b"?"))


def pack_bytes(path: Path) -> dict[str, bytes]:
    """A pack's files as bytes, the manifest with its `created` time blanked (the one value
    that differs between two runs on the same inputs)."""
    out = {p.name: p.read_bytes() for p in sorted(path.iterdir())}
    created = json.loads(out[MANIFEST])["created"]
    assert isinstance(created, str) and created
    text = out[MANIFEST].decode()
    assert text.count(created) == 1
    out[MANIFEST] = text.replace(created, "").encode()
    return out


def layered_checkpoint(path: Path, n: int = 10, seed: int = 0) -> Path:
    """A checkpoint of `n` linear layers of varying sizes (tails at block 16, biases on some)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(n):
        out_f, in_f = 16 + 8 * (i % 4), 24 + 8 * (i % 3)
        state[f"layers.{i:02d}.proj.weight"] = torch.randn(out_f, in_f, generator=g)
        if i % 2:
            state[f"layers.{i:02d}.proj.bias"] = torch.randn(out_f, generator=g)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


# Run `duquant` in a child process with small shards and a pause before each layer, so a test
# can interrupt it part-way: argv = shard_bytes, seconds per layer, then duquant's arguments.
SLOW_PACK = """
import sys, time
from duquant_cli.formats.pack import PackWriter
PackWriter.__init__.__kwdefaults__["shard_bytes"] = int(sys.argv[1])
pause = float(sys.argv[2])
import duquant_cli.commands.pack as cmd
real = cmd.build_layer
def slow(*args, **kwargs):
    time.sleep(pause)
    return real(*args, **kwargs)
cmd.build_layer = slow
from duquant_cli.cli import main
sys.argv = ["duquant", *sys.argv[3:]]
main()
"""


def slow_pack_cmd(script: Path, shard_bytes: int, pause: float, *args: object) -> list[str]:
    script.write_text(SLOW_PACK)
    return [sys.executable, str(script), str(shard_bytes), str(pause), *map(str, args)]
