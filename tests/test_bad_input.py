"""Every bad input of the hardening list in one place.

Each refusal: exit code 1, exactly one line on stderr naming the problem and the file or layer,
no traceback, and the disk unchanged (every path and byte under the test's folder, compared
before and after). Pack-side refusals also leave a model that `load_packed` was given unchanged
(module types and state dict). The inputs that are not errors (all-zero rows, tiny layers,
1-D/3-D tensors a regex matches, odd layer names, `--skip-bad`) get the checks that fit them.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import duquant_cli.formats.pack as pack_format
from duquant_cli.cli import app
from duquant_cli.commands.verify import verify_pack
from duquant_cli.errors import DuQuantError, PackError
from duquant_cli.formats.pack import MANIFEST, Pack
from duquant_cli.runtime.layer import DuQuantLinear
from duquant_cli.runtime.loader import load_packed
from tests.helpers import hidden_leftovers, small_state, write_safetensors
from tests.runtime.util import TinyNet, assert_untouched, clone_model, make_pack, snapshot
from tests.snapshots import diff, pack_bytes, tree

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def run(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def refused(result) -> str:
    """The one error line of a clean refusal."""
    assert result.exit_code == 1, result.output
    assert type(result.exception) is SystemExit  # not an escaped exception
    assert "Traceback" not in result.output
    lines = [ln for ln in ANSI.sub("", result.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


# -- the checkpoints ------------------------------------------------------------------------------


def _ckpt(tmp: Path, **changes: torch.Tensor | None) -> Path:
    state = small_state() | changes
    return write_safetensors(
        tmp / "src" / "m.safetensors", {k: v for k, v in state.items() if v is not None}
    )


def _missing(tmp: Path) -> tuple[list, str]:
    path = tmp / "nope.safetensors"
    return [path], f"{path}: no such file or folder"


def _no_weights(tmp: Path) -> tuple[list, str]:
    (tmp / "empty").mkdir()
    (tmp / "empty" / "config.json").write_text("{}")
    return [tmp / "empty"], f"{tmp / 'empty'}: no weights found"


def _truncated_header(tmp: Path) -> tuple[list, str]:
    good = _ckpt(tmp).read_bytes()
    bad = tmp / "src" / "cut.safetensors"
    bad.write_bytes(good[:40])  # the 8-byte length promises more JSON than is left
    return [bad], f"{bad}: not a readable safetensors file"


def _garbage_header(tmp: Path) -> tuple[list, str]:
    bad = tmp / "junk.safetensors"
    bad.write_bytes(struct.pack("<Q", 16) + b"{not json at all" + b"\0" * 32)
    return [bad], f"{bad}: not a readable safetensors file"


def _huge_header_length(tmp: Path) -> tuple[list, str]:
    bad = tmp / "huge.safetensors"
    bad.write_bytes(b"\xff" * 64)
    return [bad], f"{bad}: not a readable safetensors file"


def _index_missing_shard(tmp: Path) -> tuple[list, str]:
    folder = tmp / "sharded"
    state = small_state()
    keys = sorted(state)
    shards = {
        "model-00001-of-00002.safetensors": keys[:4],
        "model-00002-of-00002.safetensors": keys[4:],
    }
    weight_map = {}
    for name, ks in shards.items():
        write_safetensors(folder / name, {k: state[k] for k in ks})
        weight_map |= dict.fromkeys(ks, name)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "model-00002-of-00002.safetensors").unlink()
    missing = folder / "model-00002-of-00002.safetensors"
    return [folder], f"{missing}: shard listed in model.safetensors.index.json is missing"


def _int_selected(tmp: Path) -> tuple[list, str]:
    ckpt = _ckpt(tmp, **{"layers.0.mask.weight": torch.ones(4, 4, dtype=torch.int64)})
    key = "layers.0.mask.weight"
    return [ckpt, "--include", "mask"], f"{key}: selected tensor has dtype torch.int64, not a float"


def _bool_selected(tmp: Path) -> tuple[list, str]:
    ckpt = _ckpt(tmp, **{"layers.0.keep.weight": torch.ones(4, 4, dtype=torch.bool)})
    return [
        ckpt,
        "--include",
        "keep|mlp",
    ], "layers.0.keep.weight: selected tensor has dtype torch.bool"


def _nan_weight(tmp: Path) -> tuple[list, str]:
    w = small_state()["layers.0.mlp.up.weight"].clone()
    w[3, 5] = float("nan")
    ckpt = _ckpt(tmp, **{"layers.0.mlp.up.weight": w})
    return [ckpt], (
        "layers.0.mlp.up.weight: 1 NaN value(s) in layer layers.0.mlp.up; fix the checkpoint, "
        "or pass --skip-bad"
    )


def _inf_bias(tmp: Path) -> tuple[list, str]:
    b = small_state()["layers.0.mlp.up.bias"].clone()
    b[0], b[1], b[2] = float("inf"), -float("inf"), float("nan")
    ckpt = _ckpt(tmp, **{"layers.0.mlp.up.bias": b})
    return [ckpt], "layers.0.mlp.up.bias: 1 NaN and 2 Inf value(s) in layer layers.0.mlp.up"


def _nan_in_last_layer(tmp: Path) -> tuple[list, str]:
    """Found after other layers were staged: those are discarded too."""
    w = small_state()["layers.0.mlp.up.weight"].clone()
    w[:] = float("inf")
    ckpt = _ckpt(tmp, **{"layers.0.mlp.up.weight": w.bfloat16()})
    return [ckpt], "layers.0.mlp.up.weight: 960 Inf value(s) in layer layers.0.mlp.up"


def _bad_bits(tmp: Path) -> tuple[list, str]:
    return [_ckpt(tmp), "--bits", "w9a8"], "weight bits must be 2-8 or 16, got 9"


def _bad_layer_bits(tmp: Path) -> tuple[list, str]:
    return [_ckpt(tmp), "--layer-bits", "mlp=w4a3"], "activation bits must be 4-8 or 16, got 3"


def _bad_regex(tmp: Path) -> tuple[list, str]:
    return [_ckpt(tmp), "--exclude", "up(["], "invalid regex 'up([' for --exclude: "


def _out_exists(tmp: Path) -> tuple[list, str]:
    (tmp / "out").mkdir()
    (tmp / "out" / "mine.txt").write_text("keep me")
    return [_ckpt(tmp)], f"{tmp / 'out'}: already exists (use --force to replace it)"


def _out_under_a_file(tmp: Path) -> tuple[list, str]:
    (tmp / "afile").write_text("not a folder")
    ckpt = _ckpt(tmp)
    out = tmp / "afile" / "out"
    return [ckpt, "-o", out], f"{tmp / 'afile'}: cannot write the pack here (not a folder)"


def _out_read_only(tmp: Path) -> tuple[list, str]:
    ckpt = _ckpt(tmp)
    (tmp / "ro").mkdir()
    os.chmod(tmp / "ro", 0o555)
    return [
        ckpt,
        "-o",
        tmp / "ro" / "out",
    ], f"{tmp / 'ro'}: cannot write the pack here (Permission denied)"


def _group_not_dividing(tmp: Path) -> tuple[list, str]:
    return [
        _ckpt(tmp),
        "--group-size",
        "7",
    ], "layers.0.attn.q_proj: --group-size 7 does not divide 24"


def _partial_left(tmp: Path) -> tuple[list, str]:
    (tmp / ".out.partial").mkdir()
    (tmp / ".out.partial" / "journal.jsonl").write_text("")
    return [
        _ckpt(tmp)
    ], f"{tmp / 'out'}: an interrupted run left .out.partial beside it; pass --resume"


@dataclass(frozen=True)
class Case:
    make: Callable[[Path], tuple[list, str]]
    root_only: bool = False  # needs permission bits to bite (not root)


PACK_CASES = {
    "missing path": Case(_missing),
    "folder without weights": Case(_no_weights),
    "truncated safetensors header": Case(_truncated_header),
    "corrupt safetensors header": Case(_garbage_header),
    "absurd header length": Case(_huge_header_length),
    "shard in index missing": Case(_index_missing_shard),
    "int tensor selected by regex": Case(_int_selected),
    "bool tensor selected by regex": Case(_bool_selected),
    "NaN in a weight": Case(_nan_weight),
    "Inf and NaN in a bias": Case(_inf_bias),
    "Inf in the last layer (bf16)": Case(_nan_in_last_layer),
    "unknown --bits": Case(_bad_bits),
    "unknown --layer-bits": Case(_bad_layer_bits),
    "invalid regex": Case(_bad_regex),
    "output folder exists": Case(_out_exists),
    "output under a file": Case(_out_under_a_file),
    "output folder read-only": Case(_out_read_only, root_only=True),
    "group size not dividing": Case(_group_not_dividing),
    "interrupted run left behind": Case(_partial_left),
}


@pytest.mark.parametrize("name", list(PACK_CASES))
def test_pack_refuses_bad_input(tmp_path: Path, name: str) -> None:
    case = PACK_CASES[name]
    if case.root_only and os.geteuid() == 0:
        pytest.skip("root ignores permission bits")
    args, message = case.make(tmp_path)
    if "-o" not in args:
        args = [*args, "-o", tmp_path / "out"]
    before = tree(tmp_path)
    try:
        line = refused(run("pack", *args))
    finally:
        os.chmod(tmp_path, 0o755)
        for p in tmp_path.iterdir():
            if p.is_dir():
                os.chmod(p, 0o755)
    assert line.startswith(f"error: {message}"), line
    assert diff(before, tree(tmp_path)) == []


# -- full disk -----------------------------------------------------------------------------------


def _enospc_after(calls: int, real: Callable) -> Callable:
    seen = []

    def fail(*args, **kwargs):
        seen.append(1)
        if len(seen) > calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    return fail


@pytest.mark.parametrize("where", ["staged layer", "shard", "manifest"])
def test_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """A full disk (simulated) is one line; the output never appears; the finished layers stay in
    the partial folder, so freeing space and `--resume` finishes the same pack as a clean run."""
    ckpt = _ckpt(tmp_path)
    assert run("pack", ckpt, "-o", tmp_path / "clean").exit_code == 0
    clean = pack_bytes(tmp_path / "clean")
    out = tmp_path / "out"
    if where == "staged layer":
        # two staged layers; the third finds the disk full
        monkeypatch.setattr(pack_format, "_write_plain", _enospc_after(2, pack_format._write_plain))
    elif where == "shard":
        monkeypatch.setattr(pack_format, "save_file", _enospc_after(0, pack_format.save_file))
    else:
        real = pack_format._write_durable
        monkeypatch.setattr(
            pack_format,
            "_write_durable",
            lambda p, d: _enospc_after(0, real)(p, d) if p.name == MANIFEST else real(p, d),
        )
    line = refused(run("pack", ckpt, "-o", out))
    assert "No space left on device" in line and "rerun with --resume" in line, line
    assert str(tmp_path / ".out.partial") in line  # names the file it could not write
    assert not out.exists()
    assert hidden_leftovers(tmp_path) == [".out.partial"]  # resumable; the lock is released
    monkeypatch.undo()
    result = run("pack", ckpt, "-o", out, "--resume")
    assert result.exit_code == 0, result.output
    assert pack_bytes(out) == clean
    assert hidden_leftovers(tmp_path) == []


# -- inputs that are not errors --------------------------------------------------------------------


def test_skip_bad_packs_the_rest_and_records_it(tmp_path: Path) -> None:
    w = small_state()["layers.0.mlp.up.weight"].clone()
    w[0, 0] = float("nan")
    ckpt = _ckpt(tmp_path, **{"layers.0.mlp.up.weight": w})
    result = run("pack", ckpt, "-o", tmp_path / "out", "--skip-bad")
    assert result.exit_code == 0, result.output
    assert (
        "skipped layers.0.mlp.up.weight: 1 NaN value(s) in layers.0.mlp.up.weight" in result.stderr
    )
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["skipped"] == [
        {"key": "layers.0.mlp.up.weight", "reason": "1 NaN value(s) in layers.0.mlp.up.weight"}
    ]
    assert list(Pack.open(tmp_path / "out").layers) == ["layers.0.attn.q_proj", "layers.0.mlp.down"]
    data = json.loads(run("pack", ckpt, "-o", tmp_path / "o2", "--skip-bad", "--json").stdout)
    assert [r["name"] for r in data["layers"]] == ["layers.0.attn.q_proj", "layers.0.mlp.down"]
    assert data["skipped"] == manifest["skipped"]


def test_skip_bad_with_every_layer_bad(tmp_path: Path) -> None:
    nan = {
        k: torch.full_like(v, float("nan"))
        for k, v in small_state().items()
        if k.endswith("weight")
    }
    ckpt = _ckpt(tmp_path, **nan)
    before = tree(tmp_path)
    line = refused(run("pack", ckpt, "-o", tmp_path / "out", "--skip-bad"))
    assert line == f"error: {ckpt}: every selected layer holds NaN or Inf values; nothing to pack"
    assert diff(before, tree(tmp_path)) == []


def _finite_forward(pack_dir: Path) -> None:
    pack = Pack.open(pack_dir)
    for name, entry in pack.layers.items():
        layer = DuQuantLinear.from_pack(entry, pack.load(name), bias=None)
        for x in (torch.randn(3, entry.in_features), torch.zeros(3, entry.in_features)):
            assert torch.isfinite(layer(x)).all(), name


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--rotation", "svd"],
        ["--weight-scheme", "asym", "--group-size", "8"],
        ["--bits", "w16a16"],
    ],
)
def test_all_zero_rows_and_columns(tmp_path: Path, extra: list[str]) -> None:
    up = small_state()["layers.0.mlp.up.weight"].clone()
    up[3] = 0  # a dead output channel
    up[:, 5] = 0  # a dead input channel
    ckpt = _ckpt(
        tmp_path, **{"layers.0.mlp.up.weight": up, "layers.0.mlp.down.weight": torch.zeros(24, 40)}
    )
    result = run("pack", ckpt, "-o", tmp_path / "out", *extra)
    assert result.exit_code == 0, result.output
    report = verify_pack(tmp_path / "out")
    assert report.ok, [str(f) for f in report.failures]
    _finite_forward(tmp_path / "out")


def test_dimensions_smaller_than_the_block(tmp_path: Path) -> None:
    ckpt = write_safetensors(
        tmp_path / "tiny.safetensors",
        {
            "a.weight": torch.randn(3, 5),
            "b.weight": torch.randn(1, 1),
            "c.weight": torch.randn(2, 17),
        },
    )
    result = run("pack", ckpt, "-o", tmp_path / "out", "--block", "16", "--bits", "w4a8")
    assert result.exit_code == 0, result.output
    assert verify_pack(tmp_path / "out").ok
    entry = Pack.open(tmp_path / "out").layers["a"]
    assert entry.tensors["in2"].shape == (1, 5, 5) and entry.tensors["out"].shape == (1, 3, 3)
    _finite_forward(tmp_path / "out")


def test_1d_and_3d_tensors_matched_by_a_regex_are_listed(tmp_path: Path) -> None:
    ckpt = _ckpt(
        tmp_path,
        **{"layers.0.conv.weight": torch.randn(4, 3, 3), "layers.0.gate.weight": torch.randn(24)},
    )
    result = run("pack", ckpt, "-o", tmp_path / "out", "--include", "layers")
    assert result.exit_code == 0, result.output
    assert "skipped layers.0.conv.weight: 3-D tensor, not a linear weight" in result.stderr
    assert "skipped layers.0.gate.weight: 1-D tensor, not a linear weight" in result.stderr
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["skipped"] == [
        {"key": "layers.0.conv.weight", "reason": "3-D tensor, not a linear weight"},
        {"key": "layers.0.gate.weight", "reason": "1-D tensor, not a linear weight"},
    ]
    assert "conv" not in "".join(Pack.open(tmp_path / "out").layers)


ODD_NAMES = [
    "../../escape/up", "/abs/path", "a/b\\c", "C:\\win\\x", "..", ".hidden", "",
    "ü/../ï", "layers.0.\u202eevil", "[bold]x[/]", "[/]", "%s{0}", "nul\x00name", "\u200b",
]  # fmt: skip


def test_odd_layer_names_never_become_paths(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    state = {n + ".weight": torch.randn(8, 16, generator=g) for n in ODD_NAMES}
    ckpt = write_safetensors(tmp_path / "src" / "odd.safetensors", state)
    out = tmp_path / "deep" / "out"
    (tmp_path / "deep").mkdir()
    before = tree(tmp_path)
    for args in ([], ["--dry-run"]):
        result = run("pack", ckpt, "-o", out, "--no-default-exclude", *args)
        assert result.exit_code == 0, result.output
    assert set(tree(tmp_path)) - set(before) == {
        "deep/out", "deep/out/manifest.json", "deep/out/tensors-00001.safetensors",
    }  # fmt: skip
    pack = Pack.open(out)
    assert sorted(pack.layers) == sorted(ODD_NAMES)
    for name in ODD_NAMES:
        assert set(pack.load(name)) >= {"qweight", "scale"}
    for cmd in (["inspect", out], ["inspect", out, "--verify"], ["apply", ckpt, out]):
        result = run(*cmd)
        assert result.exit_code == 0, (cmd, result.output)


# -- packs that cannot be read: refused before the model changes -------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[TinyNet, Path]:
    root = tmp_path_factory.mktemp("tiny")
    base = TinyNet()
    return base, make_pack(root, base)


def _newer(p: Path) -> str:
    m = json.loads((p / MANIFEST).read_text())
    m["format_version"] = 2
    (p / MANIFEST).write_text(json.dumps(m))
    return f"{p}: pack format version 2 is newer than this duquant reads (1); upgrade duquant"


def _truncated_manifest(p: Path) -> str:
    text = (p / MANIFEST).read_bytes()
    (p / MANIFEST).write_bytes(text[: len(text) // 2])
    return f"{p / MANIFEST}: not valid JSON"


def _not_json(p: Path) -> str:
    (p / MANIFEST).write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary")
    return f"{p / MANIFEST}: not valid JSON"


def _deep_json(p: Path) -> str:
    (p / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    return f"{p / MANIFEST}: not valid JSON"


def _edited_shape(p: Path) -> str:
    m = json.loads((p / MANIFEST).read_text())
    m["layers"][0]["out_features"] = 999
    (p / MANIFEST).write_text(json.dumps(m))
    problem = "blocks.0.down: model has 40x56, pack has 999x56"
    return f"{p}: pack does not fit the model: 1 problem(s): {problem}"


def _edited_type(p: Path) -> str:
    m = json.loads((p / MANIFEST).read_text())
    m["layers"][1]["tensors"]["scale"]["shape"] = ["56", 1]
    (p / MANIFEST).write_text(json.dumps(m))
    return f"manifest entry for layer {m['layers'][1]['name']!r} is malformed"


def _missing_tensor_file(p: Path) -> str:
    (p / "tensors-00001.safetensors").unlink()
    return f"{p / 'tensors-00001.safetensors'}: tensor file listed in the manifest is missing"


def _huge_claim_manifest(p: Path) -> str:
    """The manifest claims a 2^20 x 2^20 layer whose tensors are 'there': refused on the header
    before anything of that size is allocated."""
    m = json.loads((p / MANIFEST).read_text())
    e = next(e for e in m["layers"] if e["name"] == "proj")
    e["tensors"]["qweight"]["shape"] = [1 << 30, 1 << 30]
    (p / MANIFEST).write_text(json.dumps(m))
    return re.compile(r"proj.*qweight.*\b1073741824, 1073741824\b")  # each reader its words


def _huge_claim_header(p: Path) -> str:
    shard = p / "tensors-00001.safetensors"
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    key = next(k for k in header if k.endswith("proj.qweight"))
    a, _ = header[key]["data_offsets"]
    header[key]["shape"] = [1 << 20, 1 << 20]
    header[key]["data_offsets"] = [a, a + (1 << 40)]
    text = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    m = json.loads((p / MANIFEST).read_text())
    m["files"][0]["bytes"] = shard.stat().st_size  # a consistent liar
    (p / MANIFEST).write_text(json.dumps(m))
    return f"{shard}: corrupt safetensors header (entry 'proj.qweight')"


def _resized_file(p: Path) -> str:
    shard = p / "tensors-00001.safetensors"
    shard.write_bytes(shard.read_bytes() + b"\0" * 8)
    size = shard.stat().st_size
    return f"{shard}: {size} bytes on disk, the manifest says {size - 8} (truncated or replaced?)"


PACK_READ_CASES = {
    "newer format version": _newer,
    "truncated manifest": _truncated_manifest,
    "manifest not JSON": _not_json,
    "manifest nested 100k deep": _deep_json,
    "manifest edited: shape": _edited_shape,
    "manifest edited: a string for a number": _edited_type,
    "missing tensor file": _missing_tensor_file,
    "manifest claims a huge tensor": _huge_claim_manifest,
    "header claims a huge tensor": _huge_claim_header,
    "file size differs from the manifest": _resized_file,
}


@pytest.mark.parametrize("name", list(PACK_READ_CASES))
def test_bad_pack_refused_model_unchanged(tmp_path: Path, tiny, name: str) -> None:
    base, pristine = tiny
    p = shutil.copytree(pristine, tmp_path / "pack")
    message = PACK_READ_CASES[name](p)
    before = tree(tmp_path)
    model = clone_model(base)
    snap = snapshot(model)
    with pytest.raises(DuQuantError) as info:
        load_packed(model, p, backend="dense")
    assert_untouched(model, snap)
    pattern = message if isinstance(message, re.Pattern) else re.compile(re.escape(message))
    text = str(info.value)
    assert "\n" not in text and pattern.search(text), text
    # the CLI readers: one line, exit 1 (inspect reads only the manifest; apply every tensor)
    manifest_only = name in ("missing tensor file", "manifest claims a huge tensor",
                             "header claims a huge tensor", "file size differs from the manifest",
                             "manifest edited: shape")  # fmt: skip
    if not manifest_only:
        assert pattern.search(refused(run("inspect", p)))
    ckpt = pristine.parent / "pack.safetensors"
    line = refused(run("apply", ckpt, p))
    assert pattern.search(line) or name == "manifest edited: shape", line
    assert diff(before, tree(tmp_path)) == []


def test_nothing_in_a_pack_is_unpickled(tmp_path: Path, tiny, monkeypatch) -> None:
    """Readers never call torch.load (pickle): safetensors and JSON only."""
    base, pristine = tiny

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called on a pack")

    monkeypatch.setattr(torch, "load", refuse)
    model = clone_model(base)
    load_packed(model, pristine, backend="dense")
    assert verify_pack(pristine).ok
    assert run("inspect", pristine).exit_code == 0
    with pytest.raises(PackError):
        Pack.open(tmp_path)  # no manifest: refused, nothing else tried
