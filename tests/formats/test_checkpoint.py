"""Reading checkpoints of every accepted kind, and the errors for unreadable ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from duquant_cli.errors import CheckpointError
from duquant_cli.formats.checkpoint import (
    Checkpoint,
    checkpoint_name,
    open_checkpoint,
    tensor_sha256,
)
from tests.helpers import small_state, write_safetensors

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _check_contents(ckpt: Checkpoint, state: dict[str, torch.Tensor]) -> None:
    assert sorted(ckpt.keys()) == sorted(state)
    for key, value in state.items():
        info = ckpt.info(key)
        assert info.key == key
        assert info.shape == tuple(value.shape)
        assert info.dtype == value.dtype
        got = ckpt.tensor(key)
        assert got.dtype == value.dtype
        assert torch.equal(got, value)


@pytest.mark.parametrize("dtype", DTYPES)
def test_single_safetensors_file(tmp_path: Path, dtype: torch.dtype) -> None:
    state = small_state(dtype)
    path = write_safetensors(tmp_path / "m.safetensors", state)
    with open_checkpoint(path) as ckpt:
        _check_contents(ckpt, state)
        assert ckpt.files == [path]
        ident = ckpt.identity()
        assert ident["name"] == "m"
        assert ident["files"] == [{"name": "m.safetensors", "bytes": path.stat().st_size}]


def test_folder_with_model_safetensors(tmp_path: Path) -> None:
    state = small_state()
    write_safetensors(tmp_path / "mymodel" / "model.safetensors", state)
    with open_checkpoint(tmp_path / "mymodel") as ckpt:
        _check_contents(ckpt, state)
        assert checkpoint_name(ckpt.path) == "mymodel"


def test_folder_with_one_other_safetensors(tmp_path: Path) -> None:
    state = small_state()
    write_safetensors(tmp_path / "m" / "weights.safetensors", state)
    with open_checkpoint(tmp_path / "m") as ckpt:
        _check_contents(ckpt, state)


def _sharded(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    keys = sorted(state)
    half = len(keys) // 2
    shards = {
        "model-00001-of-00002.safetensors": keys[:half],
        "model-00002-of-00002.safetensors": keys[half:],
    }
    weight_map = {}
    for name, ks in shards.items():
        write_safetensors(folder / name, {k: state[k] for k in ks})
        weight_map.update(dict.fromkeys(ks, name))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


@pytest.mark.parametrize("dtype", DTYPES)
def test_sharded_folder_and_index_file(tmp_path: Path, dtype: torch.dtype) -> None:
    state = small_state(dtype)
    index = _sharded(tmp_path / "sharded", state)
    for path in (tmp_path / "sharded", index):
        with open_checkpoint(path) as ckpt:
            _check_contents(ckpt, state)
            assert [f.name for f in ckpt.files] == [
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
            ]


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_state_dicts(tmp_path: Path, suffix: str, dtype: torch.dtype) -> None:
    state = small_state(dtype)
    path = tmp_path / f"model{suffix}"
    torch.save(state, path)
    with open_checkpoint(path) as ckpt:
        _check_contents(ckpt, state)


def test_torch_wrapped_state_dict_and_folder(tmp_path: Path) -> None:
    state = small_state()
    (tmp_path / "hf").mkdir()
    torch.save({"state_dict": state}, tmp_path / "hf" / "pytorch_model.bin")
    with open_checkpoint(tmp_path / "hf") as ckpt:
        _check_contents(ckpt, state)


def test_torch_legacy_format(tmp_path: Path) -> None:
    state = small_state()
    path = tmp_path / "legacy.pt"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    with open_checkpoint(path) as ckpt:
        _check_contents(ckpt, state)


def test_info_does_not_load_the_tensor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = {"big.weight": torch.zeros(300, 200, dtype=torch.bfloat16)}
    path = write_safetensors(tmp_path / "m.safetensors", state)
    ckpt = open_checkpoint(path)

    def refuse(self, key):
        raise AssertionError("info() loaded the tensor")

    monkeypatch.setattr(type(ckpt), "tensor", refuse)
    info = ckpt.info("big.weight")
    assert info.shape == (300, 200) and info.dtype == torch.bfloat16


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file or folder"):
        open_checkpoint(tmp_path / "nope.safetensors")


def test_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weights found"):
        open_checkpoint(tmp_path / "empty")


@pytest.mark.parametrize(
    "data",
    [
        b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!",  # header length fine, header garbage
        b"\xff" * 64,  # absurd header length
        b"abc",  # shorter than the length prefix
    ],
)
def test_corrupt_safetensors_header(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        open_checkpoint(path)


def test_index_with_missing_shard(tmp_path: Path) -> None:
    index = _sharded(tmp_path / "s", small_state())
    (tmp_path / "s" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors.*missing"):
        open_checkpoint(tmp_path / "s")
    with pytest.raises(CheckpointError, match="missing"):
        open_checkpoint(index)


def test_invalid_index(tmp_path: Path) -> None:
    index = tmp_path / "model.safetensors.index.json"
    index.write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        open_checkpoint(index)
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        open_checkpoint(index)


def test_bad_torch_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"definitely not a pickle")
    with pytest.raises(CheckpointError, match="not a loadable PyTorch state dict"):
        open_checkpoint(garbage)
    not_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], not_dict)
    with pytest.raises(CheckpointError, match="expected a dict of tensors"):
        open_checkpoint(not_dict)


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "weights.npz"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="unsupported checkpoint type"):
        open_checkpoint(path)


def test_unsupported_dtype_in_info(tmp_path: Path) -> None:
    path = tmp_path / "f8.safetensors"
    save_file({"w.weight": torch.zeros(2, 2, dtype=torch.float8_e4m3fn)}, str(path))
    with open_checkpoint(path) as ckpt, pytest.raises(CheckpointError, match="unsupported"):
        ckpt.info("w.weight")


def test_checkpoint_name(tmp_path: Path) -> None:
    assert checkpoint_name(tmp_path / "llama.safetensors") == "llama"
    assert checkpoint_name(tmp_path / "m" / "model.safetensors") == "m"
    assert checkpoint_name(tmp_path / "m" / "pytorch_model.bin") == "m"


def test_tensor_sha256_identity() -> None:
    t = torch.arange(6, dtype=torch.float32).view(2, 3)
    assert tensor_sha256(t) == tensor_sha256(t.clone())
    assert tensor_sha256(t) == tensor_sha256(t.mT.contiguous().mT)  # same values, same bytes
    assert tensor_sha256(t) != tensor_sha256(t.bfloat16())  # dtype is part of the identity
    t2 = t.clone()
    t2[1, 2] += 1
    assert tensor_sha256(t) != tensor_sha256(t2)
    assert len(tensor_sha256(t)) == 64


def _resident_kib(path: Path) -> int:
    """KiB of `path` resident in this process's memory maps (/proc/self/smaps), -1 off Linux."""
    smaps = Path("/proc/self/smaps")
    if not smaps.is_file():
        return -1
    total, ours = 0, False
    for line in smaps.read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:  # a mapping's first line
            ours = line.endswith(str(path))
        elif ours and head[0] == "Rss:":
            total += int(head[1])
    return total


def test_read_tensors_leave_no_pages_mapped(tmp_path: Path) -> None:
    """A tensor read and dropped leaves none of its file resident in the process: pages read
    through a handle kept open for the run would otherwise stay counted in its RSS, the whole
    checkpoint by the end (5.7 GB peak packing pi0.5's 4.6 GB checkpoint)."""
    state = {f"l{i}.weight": torch.randn(512, 1024) for i in range(4)}  # 8 MiB
    path = write_safetensors(tmp_path / "m.safetensors", state)
    if _resident_kib(path) < 0:
        pytest.skip("needs /proc/self/smaps")
    with open_checkpoint(path) as ckpt:
        for key in state:
            assert ckpt.info(key).shape == (512, 1024)
            assert float(ckpt.tensor(key).sum()) == pytest.approx(float(state[key].sum()))
        assert _resident_kib(path) < 256  # the header pages at most, never the 8 MiB of data
