"""`import-legacy`: earlier openpi-side per-layer `.npz` packs -> a pack, checked against a direct
implementation of the legacy semantics written here from the format description (block loops,
dense slices, no duquant code)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn
from typer.testing import CliRunner

from duquant_cli.cli import app
from duquant_cli.commands.import_legacy import import_legacy
from duquant_cli.commands.inspect import inspect_pack
from duquant_cli.commands.verify import verify_pack
from duquant_cli.config import Rotation
from duquant_cli.errors import CheckpointError, MismatchError, TransformError
from duquant_cli.formats.legacy import SOURCE_FORMAT, sanitize_name
from duquant_cli.formats.pack import Pack
from duquant_cli.math.bitpack import unpack_codes
from duquant_cli.runtime.calibrate import calibrating, save_act_scales
from duquant_cli.runtime.layer import DuQuantLinear, entry_problems
from duquant_cli.runtime.loader import load_packed
from duquant_cli.runtime.status import status
from tests.helpers import rel_err, write_safetensors

DIVISORS = (0.5, 0.75, 1.0, 1.25, 1.5)


# ---- the legacy side, written from the format description ----------------------------------


def svd_blocks(w: torch.Tensor, size: int) -> dict[int, np.ndarray]:
    """Rotation per block of w's columns as the legacy packer made them: the left singular
    vectors of each block's transpose, from a float32 SVD (the last block smaller)."""
    out = {}
    n = w.shape[1]
    for b, start in enumerate(range(0, n, size)):
        block = w[:, start : start + size].T.float()
        u, _, _ = torch.linalg.svd(block, full_matrices=True)
        out[b] = u.double().numpy().astype(np.float32)
    return out


def write_legacy(
    folder: Path,
    name: str,
    w: torch.Tensor,
    *,
    block: int,
    block_out: int,
    perm: torch.Tensor | None,
    rin: dict[int, np.ndarray] | None = None,
    rout: dict[int, np.ndarray] | None = None,
) -> Path:
    """One legacy file, rotations from SVD of the weight unless given."""
    out_f, in_f = w.shape
    wp = w if perm is None else w[:, perm]
    rin = svd_blocks(wp, block) if rin is None else rin
    rout = svd_blocks(w.T, block_out) if rout is None else rout
    meta = {
        "in_features": in_f,
        "out_features": out_f,
        "block_size": block,
        "block_out_size": block_out,
        "enable_permute": perm is not None,
        "lambda_smooth": 0.15,
    }
    data: dict[str, np.ndarray | str] = {
        "meta": json.dumps(meta),
        "weight_scale": (w.abs().amax(1) / 7).numpy().astype(np.float32),
    }
    if perm is not None:
        data["perm"] = perm.numpy().astype(np.int64)
    if rin:
        data["R_in_blocks"] = np.array(sorted(rin), dtype=np.int64)
        data |= {f"Rin_{b}": r for b, r in rin.items()}
    if rout:
        data["R_out_blocks"] = np.array(sorted(rout), dtype=np.int64)
        data |= {f"Rout_{b}": r for b, r in rout.items()}
    path = folder / f"{sanitize_name(name)}.npz"
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(path, **data)
    return path


def legacy_scales(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per row: max|row|/qmax divided by each of 0.5..1.5; least squared error wins."""
    qmax = 2 ** (bits - 1) - 1
    cand = (w.abs().amax(1) / qmax).clamp_min(1e-8)[:, None] / torch.tensor(DIVISORS)
    q = torch.round(w[:, None, :] / cand[..., None]).clamp(-qmax - 1, qmax) * cand[..., None]
    err = ((q - w[:, None, :]) ** 2).mean(-1)
    return cand[torch.arange(w.shape[0]), err.argmin(1)]


def legacy_codes(wp: torch.Tensor, bits: int):
    """(signed codes, per-row scales, ties): ties are the elements where W' / scale lies within
    1e-4 of a rounding boundary, so W' rebuilt with other float32 kernels may round either way."""
    qmax = 2 ** (bits - 1) - 1
    scale = legacy_scales(wp, bits)
    u = wp / scale[:, None]
    tie = ((u - u.floor()) - 0.5).abs() < 1e-4
    return torch.round(u).clamp(-qmax - 1, qmax), scale, tie


class Legacy:
    """A legacy file's transforms applied the way the format describes, block by block."""

    def __init__(self, path: Path) -> None:
        with np.load(path) as f:
            self.meta = json.loads(str(f["meta"]))
            self.perm = torch.from_numpy(f["perm"]) if "perm" in f.files else None
            self.rin = {int(b): torch.from_numpy(f[f"Rin_{b}"]) for b in f.get("R_in_blocks", [])}
            self.rout = {
                int(b): torch.from_numpy(f[f"Rout_{b}"]) for b in f.get("R_out_blocks", [])
            }

    @staticmethod
    def _cols(x: torch.Tensor, blocks: dict[int, torch.Tensor], size: int) -> torch.Tensor:
        y = x.clone()
        for b, r in blocks.items():
            s, e = b * size, min((b + 1) * size, x.shape[-1])
            y[..., s:e] = x[..., s:e] @ r[: e - s, : e - s]
        return y

    def x_prime(self, x: torch.Tensor) -> torch.Tensor:
        x = x if self.perm is None else x[..., self.perm]
        return self._cols(x, self.rin, self.meta["block_size"])

    def w_prime(self, w: torch.Tensor) -> torch.Tensor:
        """W[:, perm] with the input column blocks rotated, then each row block left-multiplied
        by its Rout."""
        w = self.x_prime(w.float())
        size = self.meta["block_out_size"]
        out = w.clone()
        for b, r in self.rout.items():
            s, e = b * size, min((b + 1) * size, w.shape[0])
            out[s:e] = r[: e - s, : e - s] @ w[s:e]
        return out

    def forward(self, x, w, bias, bits: int | None, at_ties=None) -> torch.Tensor:
        """y = x' Q(W')^T, output blocks right-multiplied by Rout, then the bias; `at_ties`
        (signed codes) settles the codes of rounding ties (see `legacy_codes`)."""
        wp = self.w_prime(w)
        if bits is not None:
            codes, scale, tie = legacy_codes(wp, bits)
            if at_ties is not None:
                codes = torch.where(tie, at_ties, codes)
            wp = codes * scale[:, None]
        y = self._cols(self.x_prime(x) @ wp.T, self.rout, self.meta["block_out_size"])
        return y if bias is None else y + bias


# ---- models and fixtures ------------------------------------------------------------------


def linear_tree(shapes: dict[str, tuple[int, int, bool]]) -> nn.Module:
    """An nn.Module whose linear layers have exactly the given dotted names."""
    root = nn.Module()
    for name, (out_f, in_f, bias) in shapes.items():
        *parents, leaf = name.split(".")
        node = root
        for p in parents:
            if not hasattr(node, p):
                node.add_module(p, nn.Module())
            node = getattr(node, p)
        node.add_module(leaf, nn.Linear(in_f, out_f, bias=bias))
    return root


def load_weights(model: nn.Module, ckpt: Path) -> nn.Module:
    with safe_open(str(ckpt), "pt") as f, torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(f.get_tensor(name))
    return model


# Layer names with characters the legacy writer replaced; `odd/proj` becomes `odd_proj`.
QKV = "blocks.0.attn.qkv"
ODD = "blocks.0.odd/proj"
SHAPES = {QKV: (24, 40, True), ODD: (36, 24, False)}


@pytest.fixture
def synthetic(tmp_path: Path) -> tuple[Path, Path]:
    """A checkpoint of two layers and their legacy files: QKV with perm, input blocks 16 + a tail
    of 8 and output blocks 10 + a tail of 4; ODD without perm or output rotation, its input
    block 1 of 16 + 8 left without a matrix (the identity)."""
    torch.manual_seed(0)
    model = linear_tree(SHAPES)
    with torch.no_grad():
        model.get_submodule(QKV).weight[:, 5] *= 10  # an outlier column
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["blocks.0.norm.weight"] = torch.ones(40)
    ckpt = write_safetensors(tmp_path / "model.safetensors", state)
    folder = tmp_path / "legacy"
    perm = torch.randperm(40)
    write_legacy(folder, QKV, state[QKV + ".weight"], block=16, block_out=10, perm=perm)
    w_odd = state[ODD + ".weight"]
    rin = svd_blocks(w_odd, 16)
    del rin[1]
    write_legacy(folder, ODD, w_odd, block=16, block_out=16, perm=None, rin=rin, rout={})
    return ckpt, folder


def imported_model(ckpt: Path, pack_dir: Path, shapes=SHAPES, **kw) -> nn.Module:
    model = load_weights(linear_tree(shapes), ckpt)
    report = load_packed(model, pack_dir, verify_source=True, **kw)
    assert sorted(report.replaced) == sorted(shapes)
    return model


def check_outputs(ckpt: Path, folder: Path, pack_dir: Path, shapes, bits, tol: float) -> None:
    model = imported_model(ckpt, pack_dir, shapes)
    pack = Pack.open(pack_dir)
    with safe_open(str(ckpt), "pt") as f, torch.no_grad():
        for name, (_, in_f, has_bias) in shapes.items():
            legacy = Legacy(folder / f"{sanitize_name(name)}.npz")
            w = f.get_tensor(name + ".weight").float()
            bias = f.get_tensor(name + ".bias") if has_bias else None
            x = torch.randn(3, 5, in_f)
            ties = None
            if bits is not None:
                ties = unpack_codes(pack.load(name)["qweight"], bits, in_f).float() - 2 ** (
                    bits - 1
                )
            want = legacy.forward(x, w, bias, bits, ties)
            got = model.get_submodule(name)(x)
            assert isinstance(model.get_submodule(name), DuQuantLinear)
            assert rel_err(got, want) < tol, name


def check_codes(ckpt: Path, folder: Path, pack_dir: Path, shapes) -> None:
    """The pack's 4-bit scales and codes are the legacy grid's, computed here from W'."""
    pack = Pack.open(pack_dir)
    with safe_open(str(ckpt), "pt") as f:
        for name in shapes:
            t = pack.load(name)
            legacy = Legacy(folder / f"{sanitize_name(name)}.npz")
            wp = legacy.w_prime(f.get_tensor(name + ".weight"))
            codes, scale, tie = legacy_codes(wp, 4)
            assert torch.allclose(t["scale"][:, 0], scale, rtol=1e-6, atol=0), name
            got = unpack_codes(t["qweight"], 4, wp.shape[1]).float() - 8
            assert torch.equal(got[~tie], codes[~tie]), name  # ties: either neighbour
            assert bool(((got - codes)[tie].abs() <= 1).all()), name


# ---- tests ----------------------------------------------------------------------------------


def test_sanitize_name_is_the_legacy_one() -> None:
    assert sanitize_name("a.b/c d:e-f_g") == "a.b_c_d_e-f_g"
    assert sanitize_name("x..y") == "x.y"
    assert sanitize_name("x...y") == "x..y"  # one pass, as the legacy writer did


def test_round_trip_unquantized_matches_the_legacy_semantics(synthetic, tmp_path: Path) -> None:
    ckpt, folder = synthetic
    out = tmp_path / "pack"
    summary = import_legacy(folder, ckpt, out, precision="w16a16")
    assert [r.name for r in summary.layers] == [QKV, ODD] and summary.out == out
    check_outputs(ckpt, folder, out, SHAPES, None, 2e-6)


def test_round_trip_w4_matches_the_legacy_grid(synthetic, tmp_path: Path) -> None:
    ckpt, folder = synthetic
    out = tmp_path / "pack"
    import_legacy(folder, ckpt, out, precision="w4a16")
    check_outputs(ckpt, folder, out, SHAPES, 4, 2e-6)
    check_codes(ckpt, folder, out, SHAPES)


def test_manifest_says_imported_and_tools_accept_it(synthetic, tmp_path: Path) -> None:
    ckpt, folder = synthetic
    out = tmp_path / "pack"
    import_legacy(folder, ckpt, out)
    pack = Pack.open(out)
    m = pack.manifest
    assert m["import"]["source_format"] == SOURCE_FORMAT == "openpi-duquant-npz"
    assert "weight_scale was ignored" in m["import"]["note"]
    assert pack.config.rotation is Rotation.SVD and str(pack.config.precision) == "w4a8"
    assert pack.config.block == 16 and pack.config.block_out == 10
    qkv, odd = pack.layers[QKV], pack.layers[ODD]
    assert qkv.transform["rotation"] == "legacy-svd" and qkv.transform["row_rot"] == "restore"
    assert qkv.transform["source_format"] == SOURCE_FORMAT
    assert qkv.transform["source_file"] == "blocks.0.attn.qkv.npz"
    assert odd.transform["source_file"] == "blocks.0.odd_proj.npz"
    assert odd.transform["row_rot"] == "off" and not odd.transform["permute"]
    assert qkv.quant["act_mode"] == "dynamic" and qkv.quant["a_bits"] == 8
    assert set(qkv.tensors) == {"perm", "in2", "in2_tail", "out", "out_tail", "qweight", "scale"}
    assert set(odd.tensors) == {"in2", "in2_tail", "qweight", "scale"}
    assert qkv.source["bias"] == QKV + ".bias" and odd.source["bias"] is None
    assert entry_problems(qkv) == [] and entry_problems(odd) == []
    rows = {r["name"]: r for r in inspect_pack(out).layers}
    assert rows[QKV]["rotation"] == "legacy-svd" and rows[QKV]["ortho_error"] < 1e-5
    report = verify_pack(out)
    assert report.ok, [str(f) for f in report.failures]


def test_real_checkpoint_layers(minilm: Path, tmp_path: Path) -> None:
    """MiniLM's real weights: a 1536x384 layer with a bias, input blocks 20 (+ a tail of 4),
    output blocks 50 (+ a tail of 36); and a 384x384 one at block 16 without a tail."""
    shapes = {
        "encoder.layer.0.intermediate.dense": (1536, 384, True),
        "encoder.layer.1.attention.self.query": (384, 384, True),
    }
    folder = tmp_path / "legacy"
    torch.manual_seed(1)
    blocks = {"encoder.layer.0.intermediate.dense": (20, 50)}
    with safe_open(str(minilm), "pt") as f:
        for name in shapes:
            block, block_out = blocks.get(name, (16, 16))
            w = f.get_tensor(name + ".weight")
            perm = torch.randperm(w.shape[1])
            write_legacy(folder, name, w, block=block, block_out=block_out, perm=perm)
    exact = tmp_path / "w16"
    import_legacy(folder, minilm, exact, precision="w16a16")
    check_outputs(minilm, folder, exact, shapes, None, 2e-6)
    w4 = tmp_path / "w4"
    summary = import_legacy(folder, minilm, w4, precision="w4a16")
    assert all(0 < r.weight_rel_error < 0.2 for r in summary.layers)
    check_outputs(minilm, folder, w4, shapes, 4, 1e-5)
    check_codes(minilm, folder, w4, shapes)
    assert verify_pack(w4).ok


def test_a_file_matching_no_layer_is_refused(synthetic, tmp_path: Path) -> None:
    ckpt, folder = synthetic
    np.savez(folder / "blocks.0.gone.npz", meta=json.dumps({}))
    (folder / "blocks.0.norm.npz").write_bytes(b"")  # a norm is 1-D: not a linear layer
    out = tmp_path / "pack"
    with pytest.raises(MismatchError) as exc:
        import_legacy(folder, ckpt, out)
    assert str(exc.value) == (
        f"{folder}: 2 file(s) match no linear layer: blocks.0.gone.npz, blocks.0.norm.npz"
    )
    assert not out.exists()


def test_a_file_matching_several_layers_is_refused(tmp_path: Path) -> None:
    w = torch.randn(8, 8)
    ckpt = write_safetensors(
        tmp_path / "m.safetensors", {"a.b c.weight": w, "a.b_c.weight": w.clone()}
    )
    write_legacy(tmp_path / "legacy", "a.b_c", w, block=4, block_out=4, perm=None)
    with pytest.raises(MismatchError, match=re.escape("a.b_c.npz (a.b c / a.b_c)")):
        import_legacy(tmp_path / "legacy", ckpt, tmp_path / "pack")


def test_a_non_orthogonal_block_is_refused(synthetic, tmp_path: Path) -> None:
    ckpt, folder = synthetic
    w = load_weights(linear_tree(SHAPES), ckpt).get_submodule(QKV).weight.detach()
    rin = svd_blocks(w, 16)
    rin[2] = rin[2] * 1.001  # the 8x8 tail
    path = write_legacy(folder, QKV, w, block=16, block_out=10, perm=None, rin=rin)
    with pytest.raises(TransformError, match=rf"^{re.escape(str(path))}: Rin_2 is not orth"):
        import_legacy(folder, ckpt, tmp_path / "pack")


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"meta_out": 25}, MismatchError, "meta is for a 25x40 layer, checkpoint layer"),
        ({"perm": torch.zeros(40, dtype=torch.int64)}, TransformError, "perm is not a perm"),
        ({"rin": {3: np.eye(16, dtype=np.float32)}}, CheckpointError, "Rin_3 is past the 3"),
        ({"rin": {2: np.eye(4, dtype=np.float32)}}, CheckpointError, "block 2 has 8 channels"),
    ],
)
def test_malformed_files_are_refused(synthetic, tmp_path, change, error, message) -> None:
    ckpt, folder = synthetic
    w = load_weights(linear_tree(SHAPES), ckpt).get_submodule(QKV).weight.detach()
    path = write_legacy(
        folder, QKV, w, block=16, block_out=10, perm=change.get("perm"), rin=change.get("rin")
    )
    if "meta_out" in change:
        with np.load(path) as f:
            data = dict(f)
        meta = json.loads(str(data["meta"])) | {"out_features": change["meta_out"]}
        np.savez(path, **(data | {"meta": json.dumps(meta)}))
    with pytest.raises(error, match=re.escape(message)):
        import_legacy(folder, ckpt, tmp_path / "pack")


def test_cli_import_legacy(synthetic, tmp_path: Path) -> None:
    ckpt, folder = synthetic
    out = tmp_path / "pack"
    args = ["import-legacy", folder, "--checkpoint", ckpt, "--out", out, "--json"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [r["name"] for r in data["layers"]] == [QKV, ODD]
    assert data["source_format"] == SOURCE_FORMAT
    again = CliRunner().invoke(app, [str(a) for a in args[:-1]])
    assert again.exit_code == 1 and "already exists" in again.stderr
    table = CliRunner().invoke(
        app, [str(a) for a in [*args[:-1], "--force"]], env={"COLUMNS": "400"}
    )
    assert table.exit_code == 0 and "weight_scale was ignored" in table.stderr


def test_calibrating_makes_the_legacy_static_activations(synthetic, tmp_path: Path) -> None:
    """The legacy runtime's static per-channel p99.9 activation scales: `calibrating` once,
    `save_act_scales`, and the imported pack loads static."""
    ckpt, folder = synthetic
    out = tmp_path / "pack"
    import_legacy(folder, ckpt, out)
    model = imported_model(ckpt, out, backend="dense")  # static scales run dense
    with torch.no_grad(), calibrating(model, percentile=99.9) as names:
        for _ in range(3):
            for name, (_, in_f, _) in SHAPES.items():
                model.get_submodule(name)(torch.randn(4, 8, in_f))
    assert sorted(names) == sorted(SHAPES)
    assert save_act_scales(model, out) == list(SHAPES)
    again = imported_model(ckpt, out)
    assert {r["activations"] for r in status(again)} == {"static (calibrated, p99.9)"}
