"""The statistics file: round trip, shared rows stored once, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from duquant_cli.errors import CheckpointError, MismatchError
from duquant_cli.formats.stats import LayerStats, Stats


def _stats() -> Stats:
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(10, 8, generator=g).half()
    own = torch.randn(6, 12, generator=g)
    return Stats(
        {
            "blk.q": LayerStats(shared.abs().amax(0).float(), shared, 40),
            "blk.k": LayerStats(shared.abs().amax(0).float(), shared, 40),
            "blk.down": LayerStats(own.abs().amax(0), own, 40),
        },
        {"max_rows": 10, "batches": 4},
    )


def test_round_trip_keeps_values_dtypes_and_sharing(tmp_path: Path) -> None:
    st = _stats()
    path = st.save(tmp_path / "s.safetensors")
    back = Stats.load(path)
    assert list(back.layers) == list(st.layers)
    for name, s in st.layers.items():
        b = back[name]
        assert torch.equal(b.amax, s.amax) and b.amax.dtype == torch.float32
        assert torch.equal(b.rows, s.rows) and b.rows.dtype == s.rows.dtype
        assert b.tokens == s.tokens
    assert back["blk.q"].rows is back["blk.k"].rows
    assert back.meta["max_rows"] == 10 and back.meta["batches"] == 4
    with safe_open(str(path), framework="pt") as fh:
        keys = set(fh.keys())
    assert "blk.k.rows" not in keys and {"blk.q.rows", "blk.k.amax"} <= keys
    assert back.nbytes == st.nbytes


def test_save_leaves_no_temporary_files(tmp_path: Path) -> None:
    _stats().save(tmp_path / "s.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]


def test_require_names_the_layer_and_the_problem() -> None:
    st = _stats()
    assert st.require("blk.q", 8) is st["blk.q"]
    with pytest.raises(MismatchError, match=r"^blk\.v: no calibration statistics .*--exclude"):
        st.require("blk.v", 8, "s.safetensors")
    with pytest.raises(MismatchError, match=r"^blk\.q: statistics in x are for 8 inputs"):
        st.require("blk.q", 16, "x")


def test_load_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such statistics file"):
        Stats.load(tmp_path / "missing.safetensors")
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(CheckpointError, match="not a duquant statistics file"):
        Stats.load(other)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors at all")
    with pytest.raises(CheckpointError, match="unreadable statistics file"):
        Stats.load(junk)
    newer = tmp_path / "newer.safetensors"
    save_file(
        {"a.amax": torch.zeros(2)},
        str(newer),
        metadata={"format": "duquant-stats", "duquant_stats": '{"format_version": 99}'},
    )
    with pytest.raises(CheckpointError, match="upgrade duquant"):
        Stats.load(newer)
