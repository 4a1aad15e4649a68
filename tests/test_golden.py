"""The stored golden pack (packs/golden, made by tests/golden.py) stays readable and reproducible.

If this fails after an intended change to the pack math or format, bump FORMAT_VERSION where
old packs can no longer be read, regenerate with `python -m tests.golden`, and say so in review.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from duquant_cli.commands.pack import pack
from duquant_cli.config import QuantConfig
from duquant_cli.formats.checkpoint import tensor_sha256
from duquant_cli.formats.pack import MANIFEST, Pack
from duquant_cli.formats.selection import Selection
from tests import golden
from tests.helpers import reference_dequant, rel_err, untransform_weight

pytestmark = pytest.mark.skipif(
    not (golden.PACK / MANIFEST).is_file() or not golden.SOURCE.is_file(),
    reason="packs/golden is missing (python -m tests.golden)",
)
INT_DTYPES = (torch.uint8, torch.int8, torch.int32, torch.int64)


@pytest.fixture(scope="module")
def stored() -> Pack:
    return Pack.open(golden.PACK)


def test_stored_source_is_the_generated_one() -> None:
    with safe_open(str(golden.SOURCE), framework="pt") as f:
        keys = set(f.keys())
        expected = golden.source_state()
        assert keys == set(expected)
        for k in keys:
            assert torch.equal(f.get_tensor(k), expected[k]), k


def test_stored_pack_reads(stored: Pack) -> None:
    assert sorted(stored.layers) == sorted(golden.LINEARS)
    for excluded in golden.EXCLUDED:
        assert excluded.removesuffix(".weight") not in stored.layers
    assert {n: str(e.precision) for n, e in stored.layers.items()} == golden.PRECISIONS
    for name, entry in stored.layers.items():
        out_f, in_f, has_bias = golden.LINEARS[name]
        assert (entry.out_features, entry.in_features) == (out_f, in_f)
        assert entry.source["bias"] == (name + ".bias" if has_bias else None)
        tensors = stored.load(name)  # checks every shape and dtype against the manifest
        assert set(tensors) >= {"perm", "in2", "out", "qweight", "scale"}
        assert ("in2_tail" in tensors) == bool(in_f % 16)
        assert ("out_tail" in tensors) == bool(out_f % 12)


def test_stored_pack_decodes_to_the_source(stored: Pack) -> None:
    with safe_open(str(golden.SOURCE), framework="pt") as src:
        for name, entry in stored.layers.items():
            w = src.get_tensor(entry.source["key"])
            assert entry.source["sha256"] == tensor_sha256(w)
            tensors = stored.load(name)
            w_prime = reference_dequant(tensors, entry.precision.w_bits, entry.in_features)
            limit = 0.2 if entry.precision.w_bits == 4 else 0.02
            assert rel_err(untransform_weight(tensors, w_prime), w) < limit


def test_repack_reproduces_the_stored_pack(stored: Pack, tmp_path: Path) -> None:
    manifest = stored.manifest
    cfg = QuantConfig.from_json(manifest["config"])
    sel_json = manifest["selection"]
    sel = Selection(
        include=tuple(sel_json["include"]),
        exclude=tuple(sel_json["exclude"]),
        scope=sel_json["scope"],
        default_exclude=sel_json["default_exclude"],
    )
    pack(golden.SOURCE, tmp_path / "again", config=cfg, selection=sel)
    fresh = Pack.open(tmp_path / "again")
    assert fresh.config == stored.config
    assert list(fresh.layers) == list(stored.layers)
    for name, old in stored.layers.items():
        new = fresh.layers[name]
        assert new.precision == old.precision
        assert new.transform == old.transform
        assert new.quant == old.quant
        assert new.source == old.source
        assert new.tensors == old.tensors  # same fields, keys, shapes, dtypes
        for key, value in old.info.items():  # new info keys may appear; old ones must agree
            assert new.info[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, key)
        a, b = stored.load(name), fresh.load(name)
        for field, t in a.items():
            if t.dtype in INT_DTYPES:  # codes, zeros, permutation: exactly
                assert torch.equal(b[field], t), (name, field)
            else:  # transforms, scales, float weights: to float tolerance
                torch.testing.assert_close(b[field], t, rtol=1e-6, atol=1e-6)


def test_manifest_is_plain_json() -> None:
    data = json.loads((golden.PACK / MANIFEST).read_text())
    assert data["source"]["path"] == "packs/golden/source.safetensors"
    assert [f["name"] for f in data["files"]] == ["tensors-00001.safetensors"]
