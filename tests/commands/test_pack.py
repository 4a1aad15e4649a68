"""The `pack` command's Python API: plan, sizes, manifest contents, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from duquant_cli import __version__
from duquant_cli.commands.pack import default_out, pack
from duquant_cli.config import Precision, QuantConfig, Rotation, RowRot, Scheme, parse_layer_bits
from duquant_cli.errors import CheckpointError, ConfigError, PackError
from duquant_cli.formats.checkpoint import tensor_sha256
from duquant_cli.formats.pack import MANIFEST, Pack
from duquant_cli.formats.selection import Selection
from tests.helpers import (
    SMALL_LINEARS,
    hidden_leftovers,
    reference_dequant,
    reference_forward,
    rel_err,
    small_state,
    untransform_weight,
    write_safetensors,
)

SIZE_CONFIGS = [
    QuantConfig(),
    QuantConfig(row_rot=RowRot.PROPAGATE),
    QuantConfig(weight_scheme=Scheme.ASYM, group_size=8, block=7, block_out=5),
    QuantConfig(rotation=Rotation.NONE, precision=Precision(16, 16)),
    QuantConfig(permute=False, row_rot=RowRot.OFF, precision=Precision(3, 8)),
    QuantConfig(layer_bits=parse_layer_bits(["up=w16a16", "down=w8a8"]), rotation=Rotation.SVD),
]


@pytest.mark.parametrize("cfg", SIZE_CONFIGS)
def test_dry_run_estimate_matches_written_sizes(tmp_path: Path, ckpt_file: Path, cfg) -> None:
    out = tmp_path / "out"
    dry = pack(ckpt_file, out, config=cfg, dry_run=True)
    assert dry.dry_run and not out.exists()
    assert hidden_leftovers(tmp_path) == []
    assert [r.name for r in dry.layers] == SMALL_LINEARS
    real = pack(ckpt_file, out, config=cfg)
    assert [r.bytes for r in dry.layers] == [r.bytes for r in real.layers]
    assert real.pack_bytes == sum(e.nbytes for e in Pack.open(out).layers.values())


def test_summary(tmp_path: Path, ckpt_file: Path) -> None:
    seen: list[tuple[str, int]] = []
    summary = pack(ckpt_file, tmp_path / "o", progress=lambda n, b: seen.append((n, b)))
    assert not summary.dry_run
    assert summary.params == 24 * 24 + 24 * 40 + 40 * 24
    assert summary.fp16_bytes == 2 * summary.params
    assert seen == [(n, r.source_bytes) for n, r in zip(SMALL_LINEARS, summary.layers, strict=True)]
    assert [r.source_bytes for r in summary.layers] == [24 * 24 * 4, 24 * 40 * 4, 40 * 24 * 4]
    assert all(0 < r.weight_rel_error < 0.2 for r in summary.layers)
    data = json.loads(json.dumps(summary.to_json()))
    assert data["layers"][1]["shape"] == [24, 40]
    assert data["size_vs_fp16"] == pytest.approx(summary.pack_bytes / summary.fp16_bytes)
    assert data["pack_bytes"] == sum(r.bytes for r in summary.layers) > 0


def test_manifest_records_everything(tmp_path: Path, ckpt_file: Path, state) -> None:
    cfg = QuantConfig(block=8, layer_bits=parse_layer_bits(["down=w8a8"]), seed=5)
    sel = Selection(exclude=("nothing-matches",))
    pack(ckpt_file, tmp_path / "o", config=cfg, selection=sel)
    manifest = json.loads((tmp_path / "o" / MANIFEST).read_text())
    assert manifest["tool"] == {"name": "duquant", "version": __version__}
    assert manifest["torch_version"] == torch.__version__
    assert manifest["created"].endswith("+00:00")
    assert QuantConfig.from_json(manifest["config"]) == cfg
    assert manifest["selection"] == {
        "include": [],
        "exclude": ["nothing-matches"],
        "scope": "",
        "default_exclude": True,
    }
    assert manifest["source"]["name"] == "tiny"
    assert manifest["source"]["files"] == [
        {"name": "tiny.safetensors", "bytes": ckpt_file.stat().st_size}
    ]
    layers = {layer["name"]: layer for layer in manifest["layers"]}
    assert list(layers) == SMALL_LINEARS
    up = layers["layers.0.mlp.up"]
    assert up["source"] == {
        "key": "layers.0.mlp.up.weight",
        "dtype": "float32",
        "sha256": tensor_sha256(state["layers.0.mlp.up.weight"]),
        "bias": "layers.0.mlp.up.bias",
    }
    assert up["transform"] == {
        "block": 8,
        "block_out": 8,
        "permute": True,
        "rotation": "hadamard",
        "row_rot": "restore",
        "calibrated": False,
    }
    assert up["quant"]["w_bits"] == 4 and up["quant"]["act_mode"] == "dynamic"
    assert layers["layers.0.mlp.down"]["precision"] == "w8a8"
    assert layers["layers.0.mlp.down"]["quant"]["w_bits"] == 8
    assert set(up["tensors"]) == {"perm", "in2", "out", "qweight", "scale"}
    assert up["tensors"]["qweight"] == {
        "key": "layers.0.mlp.up.qweight",
        "shape": [40, 12],
        "dtype": "uint8",
    }


def test_packed_layers_compute_the_linear(tmp_path: Path, ckpt_file: Path, state) -> None:
    pack(ckpt_file, tmp_path / "o", config=QuantConfig(precision=Precision(8, 8), block=8))
    p = Pack.open(tmp_path / "o")
    x = torch.randn(4, 24, generator=torch.Generator().manual_seed(0))
    for name, entry in p.layers.items():
        t = p.load(name)
        w = state[name + ".weight"]
        w_prime = reference_dequant(t, 8, entry.in_features)
        assert rel_err(untransform_weight(t, w_prime), w) < 0.02
        xin = x if entry.in_features == 24 else torch.randn(4, 40)
        assert rel_err(reference_forward(xin, t, w_prime), xin @ w.mT) < 0.02


def test_propagate_stores_rotated_bias(tmp_path: Path, ckpt_file: Path, state) -> None:
    pack(ckpt_file, tmp_path / "o", config=QuantConfig(row_rot=RowRot.PROPAGATE, block=8))
    t = Pack.open(tmp_path / "o").load("layers.0.mlp.up")
    b = state["layers.0.mlp.up.bias"]
    out = torch.block_diag(*t["out"].unbind(0))
    torch.testing.assert_close(t["bias"], b @ out.mT, rtol=1e-5, atol=1e-6)
    assert "bias" not in Pack.open(tmp_path / "o").load("layers.0.attn.q_proj")


def _pack_tensors(path: Path) -> dict[str, torch.Tensor]:
    p = Pack.open(path)
    return {f"{n}.{f}": t for n in p.layers for f, t in p.load(n).items()}


def test_repacking_is_deterministic(tmp_path: Path, ckpt_file: Path) -> None:
    # Tensors and the manifest's layer records are reproducible. (Shard *bytes* are not: the
    # safetensors writer emits the two metadata keys in hash-map order, so files[].sha256 of
    # identical packs can differ.)
    pack(ckpt_file, tmp_path / "a")
    pack(ckpt_file, tmp_path / "b")
    a, b = _pack_tensors(tmp_path / "a"), _pack_tensors(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    layers_a = json.loads((tmp_path / "a" / MANIFEST).read_text())["layers"]
    layers_b = json.loads((tmp_path / "b" / MANIFEST).read_text())["layers"]
    assert layers_a == layers_b
    pack(ckpt_file, tmp_path / "c", config=QuantConfig(seed=1))
    c = _pack_tensors(tmp_path / "c")
    assert not torch.equal(a["layers.0.mlp.up.in2"], c["layers.0.mlp.up.in2"])
    assert torch.equal(a["layers.0.mlp.up.perm"], c["layers.0.mlp.up.perm"])  # not random


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_half_and_double_sources(tmp_path: Path, dtype: torch.dtype) -> None:
    state = small_state(dtype)
    src = write_safetensors(tmp_path / "m.safetensors", state)
    summary = pack(src, tmp_path / "o")
    assert summary.layers[0].source_bytes == 24 * 24 * dtype.itemsize
    p = Pack.open(tmp_path / "o")
    entry = p.layers["layers.0.mlp.down"]
    assert entry.source["dtype"] == str(dtype).removeprefix("torch.")
    assert entry.source["sha256"] == tensor_sha256(state["layers.0.mlp.down.weight"])
    assert p.load("layers.0.mlp.down")["scale"].dtype == torch.float32


def test_default_out(tmp_path: Path, ckpt_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = QuantConfig(block=8, precision=Precision(8, 8))
    assert default_out(ckpt_file, cfg) == Path("packs/tiny-w8a8-b8")
    summary = pack(ckpt_file, config=cfg)
    assert summary.out == Path("packs/tiny-w8a8-b8")
    assert (tmp_path / "packs" / "tiny-w8a8-b8" / MANIFEST).is_file()


def test_errors_write_nothing(tmp_path: Path, ckpt_file: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(CheckpointError):
        pack(tmp_path / "missing.safetensors", out)
    with pytest.raises(ConfigError):
        pack(ckpt_file, out, selection=Selection(include=("zzz",)))
    assert not out.exists() and hidden_leftovers(tmp_path) == []
    out.mkdir()
    with pytest.raises(PackError, match="already exists"):
        pack(ckpt_file, out)
    assert list(out.iterdir()) == [] and hidden_leftovers(tmp_path) == []


def test_failure_mid_pack_publishes_nothing(
    tmp_path: Path, ckpt_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import duquant_cli.commands.pack as cmd

    real = cmd.build_layer

    def flaky(name, *args, **kwargs):
        if name.endswith("mlp.up"):
            raise KeyboardInterrupt
        return real(name, *args, **kwargs)

    monkeypatch.setattr(cmd, "build_layer", flaky)
    with pytest.raises(KeyboardInterrupt):
        pack(ckpt_file, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    # an interrupt keeps the finished layers for --resume (the lock is released)
    assert hidden_leftovers(tmp_path) == [".o.partial"]
    monkeypatch.setattr(cmd, "build_layer", real)
    with pytest.raises(PackError, match="pass --resume to continue it or --force"):
        pack(ckpt_file, tmp_path / "o")
    assert pack(ckpt_file, tmp_path / "o", resume=True).resumed == 2
    assert list(Pack.open(tmp_path / "o").layers) == SMALL_LINEARS
    assert hidden_leftovers(tmp_path) == []
