"""`duquant inspect`: the table and `--json` from the manifest alone, for packs of every kind."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from duquant_cli.commands.inspect import SCHEMA, inspect_pack
from duquant_cli.commands.pack import pack
from duquant_cli.config import QuantConfig, Rotation
from duquant_cli.formats import manifest as manifest_mod
from duquant_cli.formats import pack as pack_mod
from duquant_cli.formats.pack import Pack
from duquant_cli.runtime.loader import load_packed
from duquant_cli.runtime.memory import DTYPE_BYTES
from duquant_cli.runtime.status import status
from tests.commands.kinds import KINDS, build, copy_pack, edit_manifest, model_for, run
from tests.commands.schema_check import problems, validate
from tests.helpers import SMALL_LINEARS, small_state, write_safetensors


@pytest.fixture(scope="module")
def packs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kinds")
    return {k: build(k, root) for k in KINDS}


def _json(*args: object) -> dict:
    res = run("inspect", *args, "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _rows(doc: dict) -> dict[str, dict]:
    return {r["name"]: r for r in doc["layers"]}


@pytest.mark.parametrize("kind", KINDS)
def test_json_fits_schema_for_every_kind(packs: dict[str, Path], kind: str) -> None:
    doc = _json(packs[kind])
    validate(doc, SCHEMA)
    assert [r["name"] for r in doc["layers"]] == SMALL_LINEARS
    assert doc["pack"] == str(packs[kind])
    assert doc["config"] == Pack.open(packs[kind]).manifest["config"]
    assert doc["verify"] is None and doc["checkpoint"] is None and doc["plot"] is None


def test_schema_checker_is_not_vacuous(packs: dict[str, Path]) -> None:
    doc = _json(packs["data_free"])
    bad = copy.deepcopy(doc)
    del bad["layers"][0]["scale_max"]
    bad["layers"][1]["w_bits"] = "4"
    bad["totals"]["surprise"] = 1
    bad["layers"][2]["activations"] = "sometimes"
    found = "\n".join(problems(bad, SCHEMA))
    assert "missing 'scale_max'" in found
    assert "$.layers[1].w_bits" in found
    assert "unexpected 'surprise'" in found
    assert "$.layers[2].activations" in found


def test_data_free_rows(packs: dict[str, Path]) -> None:
    rows = _rows(_json(packs["data_free"]))
    q, up = rows["layers.0.attn.q_proj"], rows["layers.0.mlp.up"]
    assert q["shape"] == [24, 24] and q["params"] == 576
    assert (q["precision"], q["w_bits"], q["a_bits"]) == ("w4a8", 4, 8)
    assert (q["block"], q["block_out"], q["permute"]) == (16, 12, True)
    assert (q["rotation"], q["smoothed"], q["row_rot"]) == ("hadamard", False, "restore")
    assert (q["activations"], q["act_mode"], q["act_calibrated"]) == ("dynamic", "dynamic", False)
    assert q["weight_codes"] and q["code_bytes"] == 24 * 12  # two 4-bit codes per byte
    assert 0 <= q["ortho_error"] < 1e-5
    assert 0 < q["scale_min"] <= q["scale_median"] <= q["scale_max"]
    assert 0 < q["weight_rel_error"] < 0.3
    entry = Pack.open(packs["data_free"]).layers["layers.0.mlp.up"]
    assert up["pack_bytes"] == entry.nbytes
    assert up["source_dtype"] == "float32"


def test_mixed_precision_rows(packs: dict[str, Path]) -> None:
    doc = _json(packs["mixed"])
    assert doc["config"]["layer_bits"] == [
        ["attn", "w16a16"], ["mlp\\.down", "w8a8"], ["mlp\\.up", "w3a8"],
    ]  # fmt: skip
    rows = _rows(doc)
    q, down, up = (rows[n] for n in SMALL_LINEARS)
    assert q["precision"] == "w16a16" and q["activations"] == "none"
    assert not q["weight_codes"] and q["code_bytes"] is None
    assert q["scale_min"] is None and q["weight_scheme"] is None and q["weight_rel_error"] == 0.0
    assert down["precision"] == "w8a8" and down["code_bytes"] == 24 * 40  # one byte per code
    assert up["precision"] == "w3a8" and up["code_bytes"] == 40 * 12  # still two per byte
    assert (down["weight_scheme"], down["group_size"]) == ("asym", 8)


def test_calibrated_rows_leave_the_smoothed_in1_out_of_the_ortho_error(
    packs: dict[str, Path], tmp_path: Path
) -> None:
    rows = _rows(_json(packs["calibrated"]))
    for r in rows.values():
        assert r["smoothed"] and r["rotation"] == "greedy" and r["row_rot"] == "off"
        assert 0 <= r["ortho_error"] < 1e-5
    p = copy_pack(packs["calibrated"], tmp_path / "p")

    def poison(m: dict) -> None:  # an in1 error must not show: in1 is not meant orthogonal
        for e in m["layers"]:
            e["info"]["ortho_error_in1"] = 0.5
            e["info"]["ortho_error"] = 0.5

    edit_manifest(p, poison)
    assert all(r["ortho_error"] < 1e-5 for r in _json(p)["layers"])
    table = run("inspect", p).stdout
    assert "smooth+greedy" in table and "5e-01" not in table


def test_static_activation_modes(packs: dict[str, Path], tmp_path: Path) -> None:
    rows = _rows(_json(packs["static"]))
    assert {r["activations"] for r in rows.values()} == {"static (calibrated, p99.9)"}
    assert all(r["act_mode"] == "static" and r["act_calibrated"] for r in rows.values())
    p = copy_pack(packs["static"], tmp_path / "p")

    def drop_scale(m: dict) -> None:
        del m["layers"][0]["tensors"]["act_scale"]

    edit_manifest(p, drop_scale)
    doc = _json(p)
    validate(doc, SCHEMA)
    assert doc["layers"][0]["activations"] == "static (uncalibrated)"
    assert not doc["layers"][0]["act_calibrated"]


def test_totals(packs: dict[str, Path]) -> None:
    p = packs["mixed"]
    doc = _json(p)
    t, rows = doc["totals"], doc["layers"]
    pack = Pack.open(p)
    params = 24 * 24 + 24 * 40 + 40 * 24
    assert (t["layers"], t["params"]) == (3, params)
    assert t["tensor_bytes"] == sum(e.nbytes for e in pack.layers.values())
    on_disk = sum(f.stat().st_size for f in p.iterdir())
    assert t["pack_bytes"] == on_disk
    assert (t["fp16_bytes"], t["fp32_bytes"]) == (2 * params, 4 * params)
    assert t["size_vs_fp16"] == pytest.approx(t["tensor_bytes"] / (2 * params))
    assert t["size_vs_fp32"] == pytest.approx(t["size_vs_fp16"] / 2)
    for dt in ("float32", "bfloat16"):
        for b in ("dense", "int8", "int4", "auto"):
            assert t["runtime_bytes"][b][dt] == sum(r["runtime_bytes"][b][dt] for r in rows)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_runtime_bytes_and_labels_match_status_of_the_loaded_model(
    packs: dict[str, Path], kind: str, dtype: torch.dtype
) -> None:
    """What inspect predicts from the manifest is what the live layers hold and report."""
    name = str(dtype).removeprefix("torch.")
    rows = _json(packs[kind])["layers"]
    for backend in ("dense", "int8", "int4", "auto"):
        model = model_for(small_state())
        load_packed(model, packs[kind], dtype=dtype, backend=backend)
        live = {r["name"]: r for r in status(model)}
        for row in rows:
            s = live[row["name"]]
            assert s["bytes"] == row["runtime_bytes"][backend][name], (row["name"], backend)
            for key in ("shape", "precision", "activations", "row_rot", "act_calibrated"):
                assert s[key] == row[key], (row["name"], key)


def test_layer_filter(packs: dict[str, Path]) -> None:
    doc = _json(packs["data_free"], "--layer", r"mlp\.")
    assert [r["name"] for r in doc["layers"]] == ["layers.0.mlp.down", "layers.0.mlp.up"]
    assert doc["layer_filter"] == r"mlp\." and doc["totals"]["layers"] == 2
    assert doc["totals"]["params"] == 2 * 24 * 40
    res = run("inspect", packs["data_free"], "--layer", "nothing-like-this")
    assert res.exit_code == 1
    assert "--layer 'nothing-like-this' matches none of the pack's 3 layers" in res.stderr
    res = run("inspect", packs["data_free"], "--layer", "(")
    assert res.exit_code == 1 and "invalid regex" in res.stderr


def test_table(packs: dict[str, Path]) -> None:
    res = run("inspect", packs["mixed"])
    assert res.exit_code == 0, res.output
    text = res.stdout
    for needle in (
        "duquant-pack v1", "duquant 0.1.0", "created", "ckpt.safetensors", "layer_bits",
        "attn=w16a16", *SMALL_LINEARS, "w16a16", "w3a8", "hadamard", "restore", "dynamic",
        "none", "960 B", "totals", "parameters", "2,496", "runtime, dense (fp32 / bf16)",
        "runtime, int8 (fp32 / bf16)", "runtime, auto (fp32 / bf16)",
    ):  # fmt: skip
        assert needle in text, needle
    q_line = next(line for line in text.splitlines() if "layers.0.attn.q_proj" in line)
    assert q_line.split()[-1] == "-"  # a w16 layer has no scales


def test_info_keys_missing_show_dash(packs: dict[str, Path], tmp_path: Path) -> None:
    p = copy_pack(packs["data_free"], tmp_path / "old")
    edit_manifest(p, lambda m: [e.update(info={}) for e in m["layers"]])
    doc = _json(p)
    validate(doc, SCHEMA)
    row = doc["layers"][0]
    assert row["scale_min"] is None and row["ortho_error"] is None
    assert row["weight_rel_error"] is None
    line = next(ln for ln in run("inspect", p).stdout.splitlines() if "q_proj" in ln)
    assert line.split()[-3:] == ["-", "-", "-"]


def test_table_reads_only_the_manifest(packs: dict[str, Path], tmp_path: Path) -> None:
    """No tensor file is needed, and neither torch nor safetensors is imported: that is what
    keeps `inspect` instant on a large pack."""
    p = copy_pack(packs["static"], tmp_path / "p")
    for shard in p.glob("*.safetensors"):
        shard.unlink()
    code = (
        "import sys; from typer.testing import CliRunner; from duquant_cli.cli.app import app; "
        f"r = CliRunner().invoke(app, ['inspect', {str(p)!r}]); "
        f"r2 = CliRunner().invoke(app, ['inspect', {str(p)!r}, '--json']); "
        "assert r.exit_code == 0 and r2.exit_code == 0, r.output + r2.output; "
        "print(sorted(m for m in ('torch', 'safetensors') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_torch_free_constants_match_the_pack_module() -> None:
    assert {k: v.itemsize for k, v in pack_mod.DTYPES.items()} == DTYPE_BYTES
    assert (manifest_mod.FORMAT, manifest_mod.FORMAT_VERSION, manifest_mod.MANIFEST) == (
        pack_mod.FORMAT, pack_mod.FORMAT_VERSION, pack_mod.MANIFEST,
    )  # fmt: skip


def test_not_a_pack(tmp_path: Path, packs: dict[str, Path]) -> None:
    res = run("inspect", tmp_path / "nope")
    assert res.exit_code == 1 and f"{tmp_path / 'nope'}: no such pack folder" in res.stderr
    p = copy_pack(packs["data_free"], tmp_path / "newer")
    edit_manifest(p, lambda m: m.update(format_version=99))
    res = run("inspect", p)
    assert res.exit_code == 1 and "newer than this duquant reads" in res.stderr
    p = copy_pack(packs["data_free"], tmp_path / "twice")
    edit_manifest(p, lambda m: m["layers"].append(m["layers"][0]))
    res = run("inspect", p)
    assert res.exit_code == 1 and "'layers.0.attn.q_proj' listed twice" in res.stderr
    p = copy_pack(packs["data_free"], tmp_path / "broken")
    edit_manifest(p, lambda m: m["layers"][1].pop("precision"))
    res = run("inspect", p)
    assert res.exit_code == 1
    assert f"{p / 'manifest.json'}: entry for layer 'layers.0.mlp.down' is malformed" in res.stderr


def test_plot_options_need_plot(packs: dict[str, Path]) -> None:
    res = run("inspect", packs["data_free"], "--stats", "s.safetensors")
    assert res.exit_code == 1 and "--stats and --plot-layer only go with --plot" in res.stderr


def test_api(packs: dict[str, Path]) -> None:
    import duquant_cli

    report = duquant_cli.inspect_pack(packs["data_free"], layer="q_proj")
    assert report is not None and [r["name"] for r in report.layers] == [SMALL_LINEARS[0]]
    assert report.to_json() == json.loads(json.dumps(report.to_json()))
    assert inspect_pack(packs["data_free"]).totals["layers"] == 3


def test_docs_hold_the_schema_and_every_check() -> None:
    from duquant_cli.commands.verify import CHECKS

    doc = (Path(__file__).parents[2] / "docs" / "inspect.md").read_text()
    block = doc.split("## JSON schema", 1)[1].split("```json\n", 1)[1].split("\n```", 1)[0]
    assert json.loads(block) == SCHEMA
    section = doc.split("## `--verify`", 1)[1].split("\n## ", 1)[0]
    for check in CHECKS:
        assert f"`{check}`" in section, check


def test_no_rotation_has_no_ortho_error(tmp_path: Path) -> None:
    ckpt = write_safetensors(tmp_path / "c.safetensors", small_state())
    pack(ckpt, tmp_path / "p", config=QuantConfig(rotation=Rotation.NONE))
    rows = _json(tmp_path / "p")["layers"]
    assert all(r["ortho_error"] is None and r["permute"] for r in rows)
    assert all(r["rotation"] == "none" for r in rows)
