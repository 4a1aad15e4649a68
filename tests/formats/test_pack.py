"""Pack writer/reader: round trip, sharding, publishing safety, refusal of bad manifests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from duquant_cli.config import Precision, QuantConfig, Rotation
from duquant_cli.errors import PackError
from duquant_cli.formats.pack import FORMAT, FORMAT_VERSION, MANIFEST, Pack, PackWriter
from tests.helpers import hidden_leftovers

CFG = QuantConfig(block=8, rotation=Rotation.SVD, seed=3)


def _layer_tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "perm": torch.randperm(12, generator=g),
        "in2": torch.randn(1, 8, 8, generator=g),
        "in2_tail": torch.randn(4, 4, generator=g),
        "qweight": torch.randint(0, 256, (6, 6), generator=g, dtype=torch.uint8),
        "scale": torch.rand(6, 1, generator=g),
        "bias": torch.randn(6, generator=g).bfloat16(),
    }


def _add(writer: PackWriter, name: str, seed: int) -> dict[str, torch.Tensor]:
    tensors = _layer_tensors(seed)
    writer.add(
        name,
        tensors,
        shape=(6, 12),
        precision=Precision(4, 8),
        transform={"block": 8, "rotation": "svd"},
        quant={"w_bits": 4},
        source={"key": f"{name}.weight", "dtype": "float32", "sha256": "0" * 64, "bias": None},
        info={"weight_rel_error": 0.1},
    )
    return tensors


def _write(out: Path, names=("a.q", "a.k"), **kw) -> dict[str, dict[str, torch.Tensor]]:
    written = {}
    with PackWriter(out, **kw) as writer:
        for i, name in enumerate(names):
            written[name] = _add(writer, name, i)
        writer.commit({"config": CFG.to_json(), "source": {"path": "x"}})
    return written


def test_round_trip(tmp_path: Path) -> None:
    out = tmp_path / "p"
    written = _write(out)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "tensors-00001.safetensors"]
    pack = Pack.open(out)
    assert pack.config == CFG
    assert list(pack.layers) == ["a.q", "a.k"]
    entry = pack.layers["a.q"]
    assert (entry.out_features, entry.in_features) == (6, 12)
    assert entry.precision == Precision(4, 8)
    assert entry.file == "tensors-00001.safetensors"
    assert entry.tensors["in2_tail"].shape == (4, 4)
    assert entry.tensors["bias"].dtype == "bfloat16"
    assert entry.tensors["perm"].key == "a.q.perm"
    assert entry.info == {"weight_rel_error": 0.1}
    for name, tensors in written.items():
        loaded = pack.load(name)
        assert loaded.keys() == tensors.keys()
        for f, t in tensors.items():
            assert loaded[f].dtype == t.dtype
            assert torch.equal(loaded[f], t)
    assert pack.layers["a.k"].nbytes == sum(
        t.numel() * t.element_size() for t in written["a.k"].values()
    )
    assert pack.nbytes == (out / "tensors-00001.safetensors").stat().st_size


def test_manifest_top_level_and_file_hashes(tmp_path: Path) -> None:
    out = tmp_path / "p"
    _write(out, shard_bytes=1)  # every layer flushes its own shard
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["format"] == FORMAT and manifest["format_version"] == FORMAT_VERSION
    assert manifest["source"] == {"path": "x"}
    assert [f["name"] for f in manifest["files"]] == [
        "tensors-00001.safetensors",
        "tensors-00002.safetensors",
    ]
    for f in manifest["files"]:
        data = (out / f["name"]).read_bytes()
        assert f["bytes"] == len(data)
        assert f["sha256"] == hashlib.sha256(data).hexdigest()
    assert [layer["file"] for layer in manifest["layers"]] == [
        "tensors-00001.safetensors",
        "tensors-00002.safetensors",
    ]
    pack = Pack.open(out)
    assert torch.equal(pack.load("a.k")["perm"], _layer_tensors(1)["perm"])


def test_refuses_existing_output_without_force(tmp_path: Path) -> None:
    out = tmp_path / "p"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(PackError, match="already exists"):
        PackWriter(out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert hidden_leftovers(tmp_path) == []


def test_force_replaces(tmp_path: Path) -> None:
    out = tmp_path / "p"
    _write(out, names=("old",))
    (out / "stray.txt").write_text("x")
    _write(out, names=("new",), force=True)
    assert list(Pack.open(out).layers) == ["new"]
    assert not (out / "stray.txt").exists()
    assert hidden_leftovers(tmp_path) == []


def test_exception_inside_writer_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "p"
    with pytest.raises(RuntimeError, match="boom"), PackWriter(out, shard_bytes=1) as writer:
        _add(writer, "a", 0)  # a shard is already on disk in the temporary folder
        assert any(writer.tmp.iterdir())
        raise RuntimeError("boom")
    assert not out.exists()
    assert hidden_leftovers(tmp_path) == []


def test_exception_keeps_existing_pack(tmp_path: Path) -> None:
    out = tmp_path / "p"
    _write(out, names=("old",))
    with pytest.raises(RuntimeError), PackWriter(out, force=True) as writer:
        _add(writer, "new", 0)
        raise RuntimeError("interrupted")
    assert list(Pack.open(out).layers) == ["old"]
    assert hidden_leftovers(tmp_path) == []


def test_leaving_without_commit_cleans_up(tmp_path: Path) -> None:
    with PackWriter(tmp_path / "p") as writer:
        _add(writer, "a", 0)
    assert not (tmp_path / "p").exists()
    assert hidden_leftovers(tmp_path) == []


def test_refuses_unstorable_dtype(tmp_path: Path) -> None:
    with PackWriter(tmp_path / "p") as writer, pytest.raises(PackError, match="cannot store dtype"):
        writer.add(
            "a",
            {"x": torch.zeros(2, dtype=torch.complex64)},
            shape=(1, 1),
            precision=Precision(4, 8),
            transform={},
            quant={},
            source={},
            info={},
        )


def _edit_manifest(out: Path, edit) -> None:
    manifest = json.loads((out / MANIFEST).read_text())
    edit(manifest)
    (out / MANIFEST).write_text(json.dumps(manifest))


def test_refuses_newer_format_version(tmp_path: Path) -> None:
    out = tmp_path / "p"
    _write(out)
    _edit_manifest(out, lambda m: m.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(PackError, match=f"format version {FORMAT_VERSION + 1} is newer"):
        Pack.open(out)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(format="other"), "not a duquant pack manifest"),
        (lambda m: m.pop("format_version"), "format_version missing"),
        (lambda m: m.update(format_version="1"), "format_version missing or not an integer"),
        (lambda m: m.update(config={"block": 0}), "invalid config"),
        (lambda m: m.update(config={"bogus": 1}), "invalid config"),
        (lambda m: m.pop("config"), "invalid config"),
        (lambda m: m.update(layers={}), "'layers' must be a list"),
        (lambda m: m["layers"].append(m["layers"][0]), "listed twice"),
        (lambda m: m["layers"][0].pop("tensors"), "malformed"),
        (lambda m: m["layers"][0].update(precision="w9a8"), "malformed"),
        (lambda m: m["layers"][0].update(file="../../etc/passwd"), "bad tensor file name"),
        (lambda m: m["layers"][0].update(file="sub/tensors-00001.safetensors"), "bad tensor file"),
        (lambda m: m["layers"][0]["tensors"]["perm"].update(dtype="float64"), "bad dtype"),
        (lambda m: m["layers"][0]["tensors"]["perm"].update(shape=[-1]), "bad dtype or shape"),
    ],
)
def test_refuses_bad_manifest(tmp_path: Path, edit, message: str) -> None:
    out = tmp_path / "p"
    _write(out)
    _edit_manifest(out, edit)
    with pytest.raises(PackError, match=message):
        Pack.open(out)


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(PackError, match="no such pack folder"):
        Pack.open(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PackError, match="missing; not a duquant pack"):
        Pack.open(tmp_path / "empty")
    (tmp_path / "empty" / MANIFEST).write_text("{oops")
    with pytest.raises(PackError, match="not valid JSON"):
        Pack.open(tmp_path / "empty")


def test_load_checks_shape_and_dtype(tmp_path: Path) -> None:
    out = tmp_path / "p"
    _write(out)
    _edit_manifest(out, lambda m: m["layers"][0]["tensors"]["scale"].update(shape=[6, 2]))
    pack = Pack.open(out)
    with pytest.raises(PackError, match=r"tensor 'scale' is \(6, 1\) torch.float32"):
        pack.load("a.q")
    _edit_manifest(out, lambda m: m["layers"][1]["tensors"]["perm"].update(dtype="int32"))
    with pytest.raises(PackError, match="manifest says"):
        Pack.open(out).load("a.k")


def test_load_missing_tensor_or_file(tmp_path: Path) -> None:
    out = tmp_path / "p"
    _write(out)
    _edit_manifest(out, lambda m: m["layers"][0]["tensors"]["perm"].update(key="a.q.nope"))
    with pytest.raises(PackError, match=r"cannot read a\.q\.nope"):
        Pack.open(out).load("a.q")
    (out / "tensors-00001.safetensors").unlink()
    with pytest.raises(PackError, match="tensor file listed in the manifest is missing"):
        Pack.open(out).load("a.k")


def test_tensor_in_another_shard(tmp_path: Path) -> None:
    """A field may live in a later shard (calibration appends one): its ref names the file."""
    out = tmp_path / "p"
    _write(out)
    scale = torch.rand(12)
    save_file({"a.q.act_scale": scale}, str(out / "tensors-00002.safetensors"))

    def add_ref(m: dict) -> None:
        m["layers"][0]["tensors"]["act_scale"] = {
            "key": "a.q.act_scale",
            "shape": [12],
            "dtype": "float32",
            "file": "tensors-00002.safetensors",
        }

    _edit_manifest(out, add_ref)
    pack = Pack.open(out)
    assert pack.layers["a.q"].tensors["act_scale"].file == "tensors-00002.safetensors"
    loaded = pack.load("a.q")
    assert torch.equal(loaded["act_scale"], scale)
    assert torch.equal(loaded["perm"], _layer_tensors(0)["perm"])  # others from the layer's file
    _edit_manifest(out, lambda m: m["layers"][0]["tensors"]["act_scale"].update(file="../x"))
    with pytest.raises(PackError, match=r"bad tensor file name '\.\./x'"):
        Pack.open(out)
