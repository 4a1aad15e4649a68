"""The `duquant` command line: exit codes, one-line errors, dry runs, JSON output."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from duquant_cli.cli import app
from duquant_cli.formats.pack import MANIFEST, Pack
from tests.helpers import SMALL_LINEARS, hidden_leftovers

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def error_line(result) -> str:
    """The error's text: exactly one non-blank line on stderr, nothing on stdout."""
    lines = [ln for ln in ANSI.sub("", result.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert result.stdout.strip() == ""
    assert lines[0].startswith("error: ")
    return lines[0]


def assert_nothing_written(parent: Path, out: Path) -> None:
    assert not out.exists()
    assert hidden_leftovers(parent) == []


def test_pack_writes_a_pack(tmp_path: Path, ckpt_file: Path) -> None:
    out = tmp_path / "out"
    result = run("pack", ckpt_file, "-o", out, "--bits", "w8a8", "--block", "8")
    assert result.exit_code == 0, result.output
    assert "layers" in result.stdout and str(out) in result.stdout
    pack = Pack.open(out)
    assert list(pack.layers) == SMALL_LINEARS
    assert str(pack.config.precision) == "w8a8" and pack.config.block == 8


def test_missing_path(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run("pack", tmp_path / "nope.safetensors", "-o", out)
    assert result.exit_code == 1
    assert error_line(result) == f"error: {tmp_path / 'nope.safetensors'}: no such file or folder"
    assert_nothing_written(tmp_path, out)


def test_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    result = run("pack", tmp_path / "empty", "-o", out)
    assert result.exit_code == 1
    assert error_line(result).startswith(f"error: {tmp_path / 'empty'}: no weights found")
    assert_nothing_written(tmp_path, out)


@pytest.mark.parametrize(
    ("bits", "message"),
    [
        ("w9a8", "error: weight bits must be 2-8 or 16, got 9"),
        ("w4a3", "error: activation bits must be 4-8 or 16, got 3"),
        ("abc", "error: invalid precision 'abc': expected wXaY such as w4a8"),
    ],
)
def test_bad_bits(tmp_path: Path, ckpt_file: Path, bits: str, message: str) -> None:
    out = tmp_path / "out"
    result = run("pack", ckpt_file, "-o", out, "--bits", bits)
    assert result.exit_code == 1
    assert error_line(result).startswith(message)
    assert_nothing_written(tmp_path, out)


def test_bad_layer_bits(tmp_path: Path, ckpt_file: Path) -> None:
    out = tmp_path / "out"
    result = run("pack", ckpt_file, "-o", out, "--layer-bits", "mlp=w4a2")
    assert result.exit_code == 1
    assert "activation bits must be 4-8 or 16, got 2" in error_line(result)
    assert_nothing_written(tmp_path, out)


def test_regex_selecting_nothing(tmp_path: Path, ckpt_file: Path) -> None:
    out = tmp_path / "out"
    result = run("pack", ckpt_file, "-o", out, "--include", "no_such_layer")
    assert result.exit_code == 1
    assert error_line(result).startswith(f"error: no layers selected in {ckpt_file}")
    assert_nothing_written(tmp_path, out)


@pytest.mark.parametrize("flag", ["--include", "--exclude", "--layer-bits"])
def test_invalid_regex(tmp_path: Path, ckpt_file: Path, flag: str) -> None:
    out = tmp_path / "out"
    value = "[a-z]+(" + ("=w8a8" if flag == "--layer-bits" else "")
    result = run("pack", ckpt_file, "-o", out, flag, value)
    assert result.exit_code == 1
    # the pattern is shown verbatim (brackets are not eaten as console markup)
    assert error_line(result).startswith(f"error: invalid regex '[a-z]+(' for {flag}: ")
    assert_nothing_written(tmp_path, out)


def test_existing_output(tmp_path: Path, ckpt_file: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run("pack", ckpt_file, "-o", out)
    assert result.exit_code == 1
    assert error_line(result) == f"error: {out}: already exists (use --force to replace it)"
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert hidden_leftovers(tmp_path) == []
    # --force replaces it
    result = run("pack", ckpt_file, "-o", out, "--force")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "tensors-00001.safetensors"]


def test_debug_shows_the_exception(tmp_path: Path) -> None:
    result = run("--debug", "pack", tmp_path / "nope.safetensors")
    assert result.exit_code == 1
    assert type(result.exception).__name__ == "CheckpointError"


def test_dry_run_lists_layers_and_writes_nothing(tmp_path: Path, ckpt_file: Path) -> None:
    out = tmp_path / "out"
    result = run("pack", ckpt_file, "-o", out, "--dry-run", "--layer-bits", "down=w8a8")
    assert result.exit_code == 0, result.output
    text = ANSI.sub("", result.stdout)
    for name in SMALL_LINEARS:
        assert name in text
    assert re.search(r"layers\.0\.mlp\.down\s*│\s*24x40\s*│\s*w8a8", text)
    assert "embed_tokens" not in text and "lm_head" not in text
    assert_nothing_written(tmp_path, out)


def test_json_output(tmp_path: Path, ckpt_file: Path) -> None:
    out = tmp_path / "out"
    result = run("pack", ckpt_file, "-o", out, "--json", "--bits", "w4a16")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["dry_run"] is False and data["out"] == str(out)
    assert [layer["name"] for layer in data["layers"]] == SMALL_LINEARS
    assert all(layer["precision"] == "w4a16" for layer in data["layers"])
    assert data["params"] == sum(a * b for a, b in (layer["shape"] for layer in data["layers"]))
    assert data["pack_bytes"] == sum(e.nbytes for e in Pack.open(out).layers.values())


def test_json_dry_run(tmp_path: Path, ckpt_file: Path) -> None:
    out = tmp_path / "out"
    result = run("pack", ckpt_file, "-o", out, "--json", "--dry-run", "--include", "mlp")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["dry_run"] is True
    assert [layer["name"] for layer in data["layers"]] == ["layers.0.mlp.down", "layers.0.mlp.up"]
    assert_nothing_written(tmp_path, out)


def test_options_reach_the_config(tmp_path: Path, ckpt_file: Path) -> None:
    out = tmp_path / "out"
    result = run(
        "pack", ckpt_file, "-o", out, "--json", "--block", "8", "--block-out", "4",
        "--rotation", "svd", "--row-rot", "propagate", "--no-permute", "--smooth", "0.5",
        "--group-size", "8", "--weight-scheme", "asym", "--no-clip-search", "--act-scheme",
        "asym", "--act-clip", "0.9", "--seed", "7", "--exclude", "q_proj",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    pack = Pack.open(out)
    cfg = pack.config
    assert (cfg.block, cfg.block_out, cfg.rotation.value, cfg.row_rot.value) == (
        8,
        4,
        "svd",
        "propagate",
    )
    assert not cfg.permute and cfg.smooth_lambda == 0.5 and cfg.group_size == 8
    assert cfg.weight_scheme.value == "asym" and not cfg.clip_search
    assert cfg.act_scheme.value == "asym" and cfg.act_clip == 0.9 and cfg.seed == 7
    assert pack.manifest["selection"]["exclude"] == ["q_proj"]
    assert list(pack.layers) == ["layers.0.mlp.down", "layers.0.mlp.up"]
    assert "zero" in pack.layers["layers.0.mlp.up"].tensors
    assert "perm" not in pack.layers["layers.0.mlp.up"].tensors


def test_invalid_option_value(tmp_path: Path, ckpt_file: Path) -> None:
    out = tmp_path / "out"
    result = run("pack", ckpt_file, "-o", out, "--block", "0")
    assert result.exit_code == 1
    assert error_line(result) == "error: --block must be at least 1, got 0"
    result = run("pack", ckpt_file, "-o", out, "--rotation", "spiral")
    assert result.exit_code == 2  # typer's own usage error for a bad choice
    assert_nothing_written(tmp_path, out)
