"""`inspect --verify`: every file re-hashed, every invariant checked, every failure named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from duquant_cli.commands.inspect import SCHEMA
from duquant_cli.commands.pack import pack
from duquant_cli.commands.verify import CHECKS, verify_pack
from duquant_cli.config import Precision, QuantConfig
from duquant_cli.formats.pack import Pack
from tests.commands.kinds import KINDS, build, copy_pack, edit_manifest, rewrite, run
from tests.commands.schema_check import validate
from tests.helpers import SMALL_LINEARS, write_safetensors

SHARD = "tensors-00001.safetensors"
Q, DOWN, UP = SMALL_LINEARS


@pytest.fixture(scope="module")
def packs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kinds")
    return {k: build(k, root) for k in KINDS}


def _failures(pack_dir: Path) -> set[tuple[str, str]]:
    """(where, check) of every failure, checked to be among the documented checks."""
    report = verify_pack(pack_dir)
    assert all(f.check in CHECKS for f in report.failures)
    return {(f.where, f.check) for f in report.failures}


def _verify_cli(pack_dir: Path):
    res = run("inspect", pack_dir, "--verify")
    assert res.exit_code == 1, res.output
    assert len(res.stderr.strip().splitlines()) == 1  # one clean line, no traceback
    return res


@pytest.mark.parametrize("kind", KINDS)
def test_sound_packs_pass(packs: dict[str, Path], kind: str) -> None:
    report = verify_pack(packs[kind])
    assert report.ok, [str(f) for f in report.failures]
    assert report.layers_checked == 3 and report.files_checked >= 1
    assert report.tensors_read == sum(
        len(e["tensors"]) for e in json.loads((packs[kind] / "manifest.json").read_text())["layers"]
    )
    res = run("inspect", packs[kind], "--verify")
    assert res.exit_code == 0, res.output
    assert "verify: ok" in res.stdout and "FAILED" not in res.stdout


def test_flipped_byte(packs: dict[str, Path], tmp_path: Path) -> None:
    p = copy_pack(packs["data_free"], tmp_path / "p")
    shard = p / SHARD
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0x01  # inside the last tensor's data: only the checksum can notice
    shard.write_bytes(bytes(data))
    assert _failures(p) == {(SHARD, "sha256")}
    res = _verify_cli(p)
    assert f"{SHARD} [sha256]" in res.stderr
    # the file's layers are named: the checksum covers the file, not one layer
    assert all(n in res.stdout for n in SMALL_LINEARS)


def test_truncated_file(packs: dict[str, Path], tmp_path: Path) -> None:
    p = copy_pack(packs["calibrated"], tmp_path / "p")
    shard = p / SHARD
    shard.write_bytes(shard.read_bytes()[:-64])
    found = _failures(p)
    assert {(SHARD, "file-size"), (SHARD, "sha256"), (SHARD, "file-unreadable")} <= found
    assert {(n, "read") for n in SMALL_LINEARS} <= found  # every layer in it is named
    res = _verify_cli(p)
    for n in SMALL_LINEARS:
        assert f"verify FAILED {n}: read:" in res.stdout


def test_missing_file(packs: dict[str, Path], tmp_path: Path) -> None:
    p = copy_pack(packs["static"], tmp_path / "p")
    scales = p / "tensors-00002.safetensors"  # the act_scale shard
    scales.unlink()
    found = _failures(p)
    assert ("tensors-00002.safetensors", "file-missing") in found
    assert {(n, "read") for n in SMALL_LINEARS} <= found
    assert not any(c == "sha256" for _, c in found)


def test_manifest_lists_a_missing_tensor(packs: dict[str, Path], tmp_path: Path) -> None:
    p = copy_pack(packs["data_free"], tmp_path / "p")

    def ghost(m: dict) -> None:
        layer = next(e for e in m["layers"] if e["name"] == DOWN)
        layer["tensors"]["qweight"]["key"] = f"{DOWN}.ghost"

    edit_manifest(p, ghost)
    assert _failures(p) == {(DOWN, "tensor-missing")}
    res = _verify_cli(p)
    assert f"{DOWN} [tensor-missing]" in res.stderr
    assert f"qweight: key '{DOWN}.ghost' is not in {SHARD}" in res.stdout


def test_non_orthogonal_transform(packs: dict[str, Path], tmp_path: Path) -> None:
    def skew(name: str, t: dict[str, torch.Tensor]) -> None:
        if name == UP:
            t["in2"][0, 0, 1] += 1e-3

    p = rewrite(packs["data_free"], tmp_path / "p", skew)
    assert _failures(p) == {(UP, "orthogonal")}
    res = _verify_cli(p)
    assert f"{UP} [orthogonal]" in res.stderr and "in2: max |RR^T - I|" in res.stdout


def test_repeated_permutation_index(packs: dict[str, Path], tmp_path: Path) -> None:
    def repeat(name: str, t: dict[str, torch.Tensor]) -> None:
        if name == DOWN:
            t["perm"][1] = t["perm"][0]

    p = rewrite(packs["data_free"], tmp_path / "p", repeat)
    assert _failures(p) == {(DOWN, "perm")}
    idx = int(Pack.open(packs["data_free"]).load(DOWN)["perm"][0])
    res = _verify_cli(p)
    assert f"{DOWN} [perm]" in res.stderr
    assert f"not a permutation: index {idx} appears 2 times" in res.stdout


def test_all_failures_of_one_run_are_named(packs: dict[str, Path], tmp_path: Path) -> None:
    def break_two(name: str, t: dict[str, torch.Tensor]) -> None:
        if name == Q:
            t["scale"][0, 0] = -1.0
        if name == UP:
            t["out"][0] *= 2

    p = rewrite(packs["data_free"], tmp_path / "p", break_two)
    assert _failures(p) == {(Q, "scale"), (UP, "orthogonal")}
    res = run("inspect", p, "--verify", "--json")
    assert res.exit_code == 1
    doc = json.loads(res.stdout)
    validate(doc, SCHEMA)
    assert doc["verify"]["ok"] is False
    assert {(f["layer"], f["check"]) for f in doc["verify"]["failures"]} == {
        (Q, "scale"), (UP, "orthogonal"),
    }  # fmt: skip
    assert f"{Q} [scale]" in res.stderr and f"{UP} [orthogonal]" in res.stderr


def test_smoothed_in1_is_checked_for_invertibility_not_orthogonality(
    packs: dict[str, Path], tmp_path: Path
) -> None:
    sound = verify_pack(packs["calibrated"])
    assert sound.ok  # in1 = diag(1/s) R1 is far from orthogonal, and that is fine

    def singular(name: str, t: dict[str, torch.Tensor]) -> None:
        if name == Q:
            t["in1"][0, 3] = 0.0  # a zero row: not invertible

    assert _failures(rewrite(packs["calibrated"], tmp_path / "s", singular)) == {(Q, "invertible")}
    unflagged = copy_pack(packs["calibrated"], tmp_path / "u")

    def forget(m: dict) -> None:  # without the flag the same in1 must be orthogonal
        for e in m["layers"]:
            e["transform"]["smoothed"] = False

    edit_manifest(unflagged, forget)
    assert _failures(unflagged) == {(n, "orthogonal") for n in SMALL_LINEARS}


def test_codes_out_of_range(packs: dict[str, Path], tmp_path: Path) -> None:
    def high(name: str, t: dict[str, torch.Tensor]) -> None:
        if name == UP:  # w3a8: nibbles must stay below 8
            t["qweight"][2, 3] = 0x9 | (0x2 << 4)

    p = rewrite(packs["mixed"], tmp_path / "p", high)
    assert _failures(p) == {(UP, "codes")}
    assert "qweight has 1 byte(s) with a nibble >= 2^3" in _verify_cli(p).stdout


def test_pad_nibble_of_odd_width(tmp_path: Path) -> None:
    ckpt = write_safetensors(tmp_path / "odd.safetensors", {"blk.proj.weight": torch.randn(6, 13)})
    src = tmp_path / "odd"
    pack(ckpt, src, config=QuantConfig(precision=Precision(4, 8), block=4))
    assert verify_pack(src).ok

    def pad(name: str, t: dict[str, torch.Tensor]) -> None:
        t["qweight"][4, -1] |= 0x30

    p = rewrite(src, tmp_path / "p", pad)
    assert _failures(p) == {("blk.proj", "codes")}
    assert "pad nibble" in _verify_cli(p).stdout


def test_scales_finite_and_positive(packs: dict[str, Path], tmp_path: Path) -> None:
    def nan(name: str, t: dict[str, torch.Tensor]) -> None:
        if name == DOWN:
            t["scale"][3, 0] = float("nan")
        if name == UP:
            t["act_scale"][0] = 0.0

    p = rewrite(packs["static"], tmp_path / "p", nan)
    assert _failures(p) == {(DOWN, "scale"), (DOWN, "finite"), (UP, "scale")}


def test_shapes_consistent_with_blocks(packs: dict[str, Path], tmp_path: Path) -> None:
    def reblock(name: str, t: dict[str, torch.Tensor]) -> None:
        if name == Q:  # 24 inputs with block 16 need [1, 16, 16] + an 8x8 tail
            t["in2"] = torch.eye(8).expand(3, 8, 8).contiguous()
            del t["in2_tail"]

    p = rewrite(packs["data_free"], tmp_path / "p", reblock)
    assert _failures(p) == {(Q, "shape"), (Q, "fields")}
    out = _verify_cli(p).stdout
    assert "in2 is recorded as [3, 8, 8], the layer needs [1, 16, 16]" in out
    assert "in2 needs a in2_tail block of [8, 8]" in out


def test_stored_tensor_differs_from_manifest(packs: dict[str, Path], tmp_path: Path) -> None:
    p = copy_pack(packs["data_free"], tmp_path / "p")

    def lie(m: dict) -> None:
        layer = next(e for e in m["layers"] if e["name"] == UP)
        layer["tensors"]["scale"]["dtype"] = "float16"

    edit_manifest(p, lie)
    assert _failures(p) == {(UP, "dtype")}


def test_verify_respects_layer_filter(packs: dict[str, Path], tmp_path: Path) -> None:
    def repeat(name: str, t: dict[str, torch.Tensor]) -> None:
        if name == DOWN:
            t["perm"][1] = t["perm"][0]

    p = rewrite(packs["data_free"], tmp_path / "p", repeat)
    assert verify_pack(p, layer="up$").ok
    assert not verify_pack(p, layer="down$").ok


def test_tail_where_the_blocks_fit_exactly(packs: dict[str, Path], tmp_path: Path) -> None:
    def extra(name: str, t: dict[str, torch.Tensor]) -> None:
        if name == DOWN:  # 24 outputs = two 12-row blocks: no tail belongs here
            t["out_tail"] = torch.eye(4)

    p = rewrite(packs["data_free"], tmp_path / "p", extra)
    assert _failures(p) == {(DOWN, "fields")}
    assert "out_tail is stored but the dimension is a whole number of blocks" in (
        _verify_cli(p).stdout
    )
