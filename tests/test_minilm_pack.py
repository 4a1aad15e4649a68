"""The real MiniLM checkpoint packs end to end through the CLI and un-transforms back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from duquant_cli.cli import app
from duquant_cli.formats.checkpoint import tensor_sha256
from duquant_cli.formats.pack import Pack
from tests.helpers import reference_dequant, rel_err, untransform_weight

pytestmark = pytest.mark.slow

N_LINEAR = 37  # 6 layers x (query, key, value, attention output, intermediate, output) + pooler


@pytest.mark.parametrize(("bits", "limit"), [("w4a8", 0.2), ("w8a8", 0.02)])
def test_minilm_pack_round_trip(tmp_path: Path, minilm: Path, bits: str, limit: float) -> None:
    out = tmp_path / "pack"
    result = CliRunner().invoke(
        app, ["pack", str(minilm), "-o", str(out), "--bits", bits, "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert len(summary["layers"]) == N_LINEAR

    pack = Pack.open(out)
    names = list(pack.layers)
    assert len(names) == N_LINEAR
    assert names.count("pooler.dense") == 1
    assert sum(".attention.self.query" in n for n in names) == 6
    assert not any("embeddings" in n or "LayerNorm" in n for n in names)

    worst = 0.0
    with safe_open(str(minilm), framework="pt") as src:
        for name, entry in pack.layers.items():
            w = src.get_tensor(entry.source["key"])
            assert entry.source["sha256"] == tensor_sha256(w)
            assert entry.source["bias"] == name + ".bias"
            assert (entry.out_features, entry.in_features) == tuple(w.shape)
            tensors = pack.load(name)
            w_prime = reference_dequant(tensors, entry.precision.w_bits, entry.in_features)
            err = rel_err(untransform_weight(tensors, w_prime), w)
            assert err == pytest.approx(entry.info["weight_rel_error"], rel=1e-3, abs=1e-5)
            worst = max(worst, err)
    assert worst < limit
