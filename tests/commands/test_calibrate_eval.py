"""`duquant calibrate` and `duquant eval` on a tiny random Llama (needs the `hf` extra)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from duquant_cli.cli import app
from duquant_cli.formats.pack import Pack
from duquant_cli.formats.stats import Stats

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

runner = CliRunner()
WORDS = [f"w{i}" for i in range(60)]


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> tuple[Path, Path]:
    """(model folder, text file): a 2-layer Llama with a word-level tokenizer, saved with
    save_pretrained exactly as a Hugging Face checkpoint is."""
    root = tmp_path_factory.mktemp("tiny_lm")
    vocab = {w: i for i, w in enumerate(["[UNK]", *WORDS])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    config = transformers.LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    folder = root / "model"
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    g = torch.Generator().manual_seed(1)
    text = " ".join(WORDS[int(i)] for i in torch.randint(0, 60, (2000,), generator=g))
    (root / "text.txt").write_text(text)
    return folder, root / "text.txt"


def _calibrate(folder: Path, text: Path, out: Path, *args: str):
    cmd = ["calibrate", str(folder), "--text", str(text), "--out", str(out)]
    return runner.invoke(app, [*cmd, "--windows", "2", "--length", "64", *args])


def test_calibrate_pack_eval(lm, tmp_path: Path) -> None:
    folder, text = lm
    stats_file = tmp_path / "s.safetensors"
    res = _calibrate(folder, text, stats_file, "--offset", "3", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["layers"] == 14 and summary["rows"] == 128 and summary["offset"] == 3
    stats = Stats.load(stats_file)
    # the decoder's linear layers under their full-model names; the output head is not run
    assert "model.layers.0.self_attn.q_proj" in stats and "lm_head" not in stats
    assert (
        stats["model.layers.0.self_attn.k_proj"].rows
        is stats["model.layers.0.self_attn.q_proj"].rows
    )
    assert stats.meta["source"]["windows"] == 2

    res = runner.invoke(
        app, ["pack", str(folder), "--calib", str(stats_file), "-o", str(tmp_path / "p")]
    )
    assert res.exit_code == 0, res.output
    assert len(Pack.open(tmp_path / "p").layers) == 14

    cmd = ["eval", str(folder), "--text", str(text), "--pack", str(tmp_path / "p")]
    res = runner.invoke(app, [*cmd, "--windows", "2", "--length", "64", "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.output)
    fp, packed = result["rows"]
    assert fp["pack"] is None and packed["pack"] == str(tmp_path / "p")
    assert packed["layers"] == 14
    assert 1.0 < fp["ppl"] < 200 and 1.0 < packed["ppl"] < 200
    assert packed["vs_fp"] == pytest.approx(packed["ppl"] / fp["ppl"] - 1)

    res = runner.invoke(app, [*cmd, "--windows", "2", "--length", "64"])
    assert res.exit_code == 0, res.output
    assert "perplexity" in res.output and "fp32" in res.output and "%" in res.output


def test_calibrate_refuses_to_overwrite_and_bad_inputs(lm, tmp_path: Path) -> None:
    folder, text = lm
    out = tmp_path / "s.safetensors"
    out.write_text("keep me")
    res = _calibrate(folder, text, out)
    assert res.exit_code == 1 and "already exists (use --force" in res.output
    assert out.read_text() == "keep me"
    res = _calibrate(folder, tmp_path / "missing.txt", tmp_path / "t.safetensors")
    assert res.exit_code == 1 and "no such text file" in res.output
    res = _calibrate(folder, text, tmp_path / "t.safetensors", "--offset", "1000")
    assert res.exit_code == 1 and "text too short" in res.output
    assert not (tmp_path / "t.safetensors").exists()
    assert len(res.output.strip().splitlines()) == 1
    res = _calibrate(folder, text, tmp_path / "t.safetensors", "--preset", "pi05")
    assert res.exit_code == 1 and "no linear layer of LlamaForCausalLM is selected" in res.output


def test_eval_rejects_a_pack_of_another_model(lm, tmp_path: Path) -> None:
    folder, text = lm
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"model.layers.0.mlp.up_proj.weight": torch.randn(8, 8)}, str(other))
    assert runner.invoke(app, ["pack", str(other), "-o", str(tmp_path / "p")]).exit_code == 0
    res = runner.invoke(
        app,
        ["eval", str(folder), "--text", str(text), "--pack", str(tmp_path / "p"),
         "--windows", "1", "--length", "32"],
    )  # fmt: skip
    assert res.exit_code == 1 and "does not fit the model" in res.output
