"""Hostile packs, case by case: sizes and counts are checked against the files before anything
is read or allocated, types are never coerced, and a pack is never unpickled."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path

import pytest

import duquant_cli.formats.manifest as manifest_format
import duquant_cli.formats.pack as pack_format
from duquant_cli.commands.inspect import inspect_pack
from duquant_cli.errors import PackError
from duquant_cli.formats.manifest import MANIFEST, read_manifest
from duquant_cli.formats.pack import Pack, read_header
from tests.commands.kinds import build

SHARD = "tensors-00001.safetensors"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build("mixed", tmp_path_factory.mktemp("hostile"))


@pytest.fixture
def pack_dir(tmp_path: Path, pristine: Path) -> Path:
    return shutil.copytree(pristine, tmp_path / "p")


def _edit(p: Path, edit) -> None:
    m = json.loads((p / MANIFEST).read_text())
    edit(m)
    (p / MANIFEST).write_text(json.dumps(m))


def _header(raw: dict, data: bytes = b"", length: int | None = None) -> bytes:
    text = json.dumps(raw).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"", "bad header length"),
        (b"\x05\x00", "bad header length"),
        (struct.pack("<Q", 1) + b"{", "bad header length"),
        (struct.pack("<Q", 50) + b"{}", "bad header length"),  # longer than the file
        (struct.pack("<Q", 2**64 - 1) + b"{}", "bad header length"),
        (_header([1, 2]), "header is not a JSON object"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "header is not JSON"),
        (_header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}), "entry 'a'"),
        (_header({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8), "'a'"),
        (_header({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "'a'"),
        (_header({"a": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 0]}}), "entry 'a'"),
        (_header({"a": {"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}}, b"\0"), "'a'"),
        (_header({"a": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}}, b"\0" * 2), "'a'"),
        (
            _header({"a": {"dtype": "U8", "shape": [2**40, 2**40], "data_offsets": [0, 2**80]}}),
            "'a'",
        ),
        (_header({"a": [1, 2, 3]}), "entry 'a'"),
    ],
)
def test_read_header_refuses(tmp_path: Path, content: bytes, why: str) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(PackError, match=f"^{path}: .*{why}"):
        read_header(path)


def test_read_header_reads_a_real_file(pristine: Path) -> None:
    header = read_header(pristine / SHARD)
    entry = Pack.open(pristine).layers["layers.0.mlp.up"]
    for ref in entry.tensors.values():
        assert header[ref.key] == (ref.dtype, ref.shape)


def test_header_beyond_the_size_limit(tmp_path: Path) -> None:
    """A header length over 100 MB is refused without reading it (the file is sparse)."""
    path = tmp_path / "big.safetensors"
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", 200 << 20))
        fh.truncate(300 << 20)
    with pytest.raises(PackError, match="bad header length"):
        read_header(path)


def test_load_checks_the_header_before_reading(pack_dir: Path, monkeypatch) -> None:
    """A manifest claiming another shape is refused from the header: get_tensor is never
    called, so nothing of the claimed size is allocated."""
    _edit(pack_dir, lambda m: m["layers"][1]["tensors"]["qweight"].update(shape=[2**30, 2**30]))

    real = pack_format.safe_open

    class Guard:
        def __init__(self, *args, **kwargs) -> None:
            self.handle = real(*args, **kwargs)

        def get_tensor(self, key: str):
            assert not key.endswith(".qweight"), "read a tensor before checking its header"
            return self.handle.get_tensor(key)

    monkeypatch.setattr(pack_format, "safe_open", Guard)
    pack = Pack.open(pack_dir)
    name = list(pack.layers)[1]
    with pytest.raises(PackError, match=r"tensor 'qweight' is \(\d+, \d+\) torch.uint8, manifest"):
        pack.load(name)


def test_unknown_layer_name(pristine: Path) -> None:
    with pytest.raises(PackError, match="no layer 'nope' in the pack"):
        Pack.open(pristine).load("nope")


def test_manifest_file_too_large(pack_dir: Path) -> None:
    os.truncate(pack_dir / MANIFEST, (256 << 20) + 1)  # sparse: not read, not allocated
    with pytest.raises(PackError, match="more than any manifest"):
        read_manifest(pack_dir)


def test_too_many_layers(pack_dir: Path, monkeypatch) -> None:
    monkeypatch.setattr(manifest_format, "MAX_LAYERS", 2)
    with pytest.raises(PackError, match="3 layers, more than 2"):
        Pack.open(pack_dir)


def _first(m: dict) -> dict:
    return m["layers"][0]


def _second(m: dict) -> dict:  # a quantized layer (the first is w16a16)
    return m["layers"][1]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: _first(m).update(name=["a"]), "a layer's 'name' is ['a'], not a string"),
        (lambda m: _first(m).update(name=7), "a layer's 'name' is 7, not a string"),
        (lambda m: _first(m).update(out_features="24"), "'out_features' is '24', not a positive"),
        (lambda m: _first(m).update(in_features=True), "'in_features' is True, not a positive"),
        (lambda m: _first(m).update(in_features=0), "'in_features' is 0, not a positive"),
        (lambda m: _first(m).update(out_features=2**31), "not a positive integer"),
        (lambda m: _first(m).update(transform=[["block", 16]]), "'transform' is"),
        (lambda m: _first(m).update(info="x"), "'info' is 'x', not a JSON object"),
        (lambda m: _first(m)["transform"].update(block="16"), "transform.block is '16'"),
        (lambda m: _first(m)["transform"].update(row_rot="sideways"), "transform.row_rot"),
        (lambda m: _first(m)["quant"].update(act_clip="abc"), "quant.act_clip is 'abc'"),
        (lambda m: _first(m)["quant"].update(act_clip=float("nan")), "quant.act_clip is nan"),
        (lambda m: _first(m)["quant"].update(group_size=0), "quant.group_size is 0"),
        (lambda m: _first(m)["quant"].update(act_mode="turbo"), "quant.act_mode is 'turbo'"),
        (lambda m: _second(m)["tensors"]["scale"].update(shape=["24", 1]), "has shape"),
        (lambda m: _second(m)["tensors"]["scale"].update(shape=[1.5, 1]), "has shape"),
        (lambda m: _second(m)["tensors"]["scale"].update(shape=[1] * 9), "has shape"),
        (lambda m: _second(m)["tensors"]["scale"].update(shape=[]), "has shape \\[\\], not 2-D"),
        (lambda m: _first(m)["tensors"]["perm"].update(shape=[2**41]), "bad dtype or shape"),
        (lambda m: _first(m)["tensors"]["perm"].update(key=5), "'key' is 5, not a string"),
        (lambda m: _first(m)["tensors"]["perm"].update(file=5), "has file 5"),
        (lambda m: _first(m)["tensors"].update({f"x{i}": {} for i in range(70)}), "more than 64"),
        (lambda m: m.update(files="x"), "'files' must be a list"),
        (lambda m: m.update(files=[{"name": "../x", "bytes": 1}]), "bad 'files' record"),
        (lambda m: m["files"][0].update(bytes=-1), "bad 'files' record"),
        (lambda m: m["files"][0].update(bytes="20"), "bad 'files' record"),
        (lambda m: m["files"][0].update(sha256=5), "bad 'files' record"),
        (lambda m: m["files"].append(m["files"][0]), "bad 'files' record"),
    ],
)
def test_manifest_types_are_not_coerced(pack_dir: Path, edit, message: str) -> None:
    _edit(pack_dir, edit)
    with pytest.raises(PackError) as info:
        Pack.open(pack_dir)
    assert message in str(info.value) or re.search(message, str(info.value)), str(info.value)
    with pytest.raises(PackError):
        inspect_pack(pack_dir)


def test_legit_packs_still_open(pristine: Path) -> None:
    """The strict parse accepts what the writers write, old packs included (tests/test_golden.py
    keeps a stored one)."""
    assert len(Pack.open(pristine).layers) == 3
    assert inspect_pack(pristine).totals["layers"] == 3
