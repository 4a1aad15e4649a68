"""Presets: `pi05` on a randomly initialised model with exactly pi0.5's module names.

The model below mirrors openpi's PI0Pytorch for pi0.5 (PaliGemma with its SigLIP tower and
projector, the Gemma language model, the Gemma action expert with adaptive RMSNorm `dense`
layers, the action and time projections) at widths of 32-96, two layers each.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from duquant_cli.cli import app
from duquant_cli.commands.pack import calibrated_config, pack
from duquant_cli.commands.presets import list_presets
from duquant_cli.config import Precision, QuantConfig
from duquant_cli.errors import ConfigError, MismatchError
from duquant_cli.formats.checkpoint import open_checkpoint
from duquant_cli.formats.pack import Pack
from duquant_cli.formats.selection import Selection, select_layers
from duquant_cli.presets import PI05, PRESETS, Preset, get_preset
from duquant_cli.runtime.collect import collect_stats
from duquant_cli.runtime.layer import DuQuantLinear
from duquant_cli.runtime.loader import load_packed
from duquant_cli.runtime.status import status
from tests.helpers import rel_err, write_safetensors

LAYERS = 2
LM, EXPERT, VISION, VOCAB = 48, 32, 32, 100
LM_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
LM_PREFIX = "paligemma_with_expert.paligemma.model.language_model.layers"
EXPERT_PREFIX = "paligemma_with_expert.gemma_expert.model.layers"

# Written out, not derived from the preset's regexes: 7 per LM layer, 3 per expert layer.
EXPECTED = [
    f"{LM_PREFIX}.{i}.{part}"
    for i in range(LAYERS)
    for part in [f"self_attn.{p}" for p in LM_ATTN] + [f"mlp.{p}" for p in MLP]
] + [f"{EXPERT_PREFIX}.{i}.mlp.{p}" for i in range(LAYERS) for p in MLP]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, cond: int | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        if cond is not None:  # pi0.5's adaptive RMSNorm: scale, shift and gate from the time
            self.dense = nn.Linear(cond, 3 * dim)


def _attn(width: int, heads: int = 2, head_dim: int = 32, kv: int = 1, out: str = "o_proj"):
    m = nn.Module()
    m.q_proj = nn.Linear(width, heads * head_dim, bias=False)
    m.k_proj = nn.Linear(width, kv * head_dim, bias=False)
    m.v_proj = nn.Linear(width, kv * head_dim, bias=False)
    setattr(m, out, nn.Linear(heads * head_dim, width, bias=False))
    return m


def _mlp(width: int, hidden: int) -> nn.Module:
    m = nn.Module()
    m.gate_proj = nn.Linear(width, hidden, bias=False)
    m.up_proj = nn.Linear(width, hidden, bias=False)
    m.down_proj = nn.Linear(hidden, width, bias=False)
    return m


def _decoder_layer(width: int, hidden: int, cond: int | None = None) -> nn.Module:
    m = nn.Module()
    m.self_attn = _attn(width)
    m.mlp = _mlp(width, hidden)
    m.input_layernorm = RMSNorm(width, cond)
    m.post_attention_layernorm = RMSNorm(width, cond)
    return m


def _block(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
    a, m = layer.self_attn, layer.mlp
    mixed = a.q_proj(h) + torch.cat([a.k_proj(h), a.v_proj(h)], -1)
    h = h + a.o_proj(torch.nn.functional.gelu(mixed))
    return h + m.down_proj(torch.nn.functional.gelu(m.gate_proj(h)) * m.up_proj(h))


def _siglip_layer(width: int) -> nn.Module:
    m = nn.Module()
    m.self_attn = _attn(width, heads=1, out="out_proj")
    m.layer_norm1 = nn.LayerNorm(width)
    m.layer_norm2 = nn.LayerNorm(width)
    m.mlp = nn.Module()
    m.mlp.fc1 = nn.Linear(width, 2 * width)
    m.mlp.fc2 = nn.Linear(2 * width, width)
    return m


class Pi05Toy(nn.Module):
    """pi0.5's module tree (openpi PI0Pytorch, pi05=True) with small widths, random weights."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        vision = nn.Module()
        vision.vision_model = nn.Module()
        vision.vision_model.embeddings = nn.Module()
        vision.vision_model.embeddings.patch_embedding = nn.Conv2d(3, VISION, 4, 4)
        vision.vision_model.embeddings.position_embedding = nn.Embedding(16, VISION)
        vision.vision_model.encoder = nn.Module()
        vision.vision_model.encoder.layers = nn.ModuleList(
            _siglip_layer(VISION) for _ in range(LAYERS)
        )
        vision.vision_model.post_layernorm = nn.LayerNorm(VISION)
        language = nn.Module()
        language.embed_tokens = nn.Embedding(VOCAB, LM)
        language.layers = nn.ModuleList(_decoder_layer(LM, 2 * LM) for _ in range(LAYERS))
        language.norm = RMSNorm(LM)
        paligemma = nn.Module()
        paligemma.model = nn.Module()
        paligemma.model.vision_tower = vision
        paligemma.model.multi_modal_projector = nn.Module()
        paligemma.model.multi_modal_projector.linear = nn.Linear(VISION, LM)
        paligemma.model.language_model = language
        paligemma.lm_head = nn.Linear(LM, VOCAB, bias=False)
        expert = nn.Module()
        expert.model = nn.Module()
        expert.model.layers = nn.ModuleList(
            _decoder_layer(EXPERT, 2 * EXPERT, cond=EXPERT) for _ in range(LAYERS)
        )
        expert.model.norm = RMSNorm(EXPERT, cond=EXPERT)
        expert.lm_head = nn.Linear(EXPERT, VOCAB, bias=False)
        self.paligemma_with_expert = nn.Module()
        self.paligemma_with_expert.paligemma = paligemma
        self.paligemma_with_expert.gemma_expert = expert
        self.action_in_proj = nn.Linear(7, EXPERT)
        self.action_out_proj = nn.Linear(EXPERT, 7)
        self.time_mlp_in = nn.Linear(EXPERT, EXPERT)
        self.time_mlp_out = nn.Linear(EXPERT, EXPERT)

    def forward(self, prefix: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Not pi0.5's computation, but every preset layer on a path from input to output: the
        prefix through the language model, the actions through the expert."""
        pg = self.paligemma_with_expert
        for layer in pg.paligemma.model.language_model.layers:
            prefix = _block(layer, prefix)
        suffix = self.action_in_proj(actions)
        for layer in pg.gemma_expert.model.layers:
            suffix = _block(layer, suffix)
        return self.action_out_proj(suffix + prefix.mean(1, keepdim=True)[..., :EXPERT])


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


@pytest.fixture(scope="module")
def pi05(tmp_path_factory) -> tuple[Pi05Toy, Path]:
    """The toy policy and its state dict as a safetensors checkpoint."""
    model = Pi05Toy()
    path = tmp_path_factory.mktemp("pi05") / "model.safetensors"
    write_safetensors(path, {k: v.detach() for k, v in model.state_dict().items()})
    return model, path


def fresh(pi05) -> Pi05Toy:
    model = Pi05Toy()
    model.load_state_dict(pi05[0].state_dict())
    return model


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def test_the_toy_has_every_kind_of_pi05_linear(pi05) -> None:
    names = linear_names(pi05[0])
    # vision 6/layer, projector, LM 7/layer, lm_head, expert 7 + 2 norm denses/layer, final
    # norm dense, expert lm_head, action in/out, time in/out
    assert len(names) == 6 * LAYERS + 1 + 7 * LAYERS + 1 + 9 * LAYERS + 1 + 1 + 4
    for wanted in (
        "paligemma_with_expert.paligemma.model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj",
        "paligemma_with_expert.paligemma.model.multi_modal_projector.linear",
        "paligemma_with_expert.paligemma.lm_head",
        f"{EXPERT_PREFIX}.1.self_attn.o_proj",
        f"{EXPERT_PREFIX}.0.input_layernorm.dense",
        "paligemma_with_expert.gemma_expert.model.norm.dense",
        "action_in_proj",
        "time_mlp_out",
    ):
        assert wanted in names
    assert set(EXPECTED) < set(names)


def test_preset_matches_exactly_the_intended_linears(pi05) -> None:
    assert [n for n in linear_names(pi05[0]) if PI05.matches(n)] == EXPECTED
    assert len(EXPECTED) == 7 * LAYERS + 3 * LAYERS
    assert not any(PI05.matches(n) for n in EXPECTED if ".gemma_expert." in n and "self_attn" in n)


def test_preset_matches_under_a_wrapper_prefix() -> None:
    assert PI05.matches("policy." + EXPECTED[0])
    assert not PI05.matches("policy.x" + EXPECTED[0])  # a name boundary, not any substring
    assert not PI05.matches(EXPECTED[0] + ".lora")


def test_preset_selection_picks_exactly_the_intended_checkpoint_layers(pi05) -> None:
    with open_checkpoint(pi05[1]) as ckpt:
        plan = select_layers(ckpt, PI05.selection(), QuantConfig())
    assert [pl.name for pl in plan.layers] == sorted(EXPECTED)  # safetensors sorts its keys
    assert plan.skipped == []


def test_extra_exclude_narrows_and_excludes_win_over_extra_include(pi05) -> None:
    sel = PI05.selection(include=("vision_tower", "time_mlp_in"), exclude=(r"layers\.1\.",))
    with open_checkpoint(pi05[1]) as ckpt:
        names = [pl.name for pl in select_layers(ckpt, sel, QuantConfig()).layers]
    assert names == sorted(n for n in EXPECTED if ".layers.1." not in n)


def test_preset_defaults_yield_to_typed_options() -> None:
    base = QuantConfig(precision=Precision(8, 8), block=8, seed=3)
    assert PI05.config(base).precision == Precision(4, 8)
    assert PI05.config(base).block == 16 and PI05.config(base).seed == 3
    kept = PI05.config(base, {"precision", "block"})
    assert kept.precision == Precision(8, 8) and kept.block == 8


def test_unknown_preset() -> None:
    with pytest.raises(ConfigError, match=r"^unknown preset 'pi0': choose one of pi05$"):
        get_preset("pi0")


def test_presets_are_data() -> None:
    listed = list_presets()
    assert [p["name"] for p in listed] == sorted(PRESETS)
    assert listed[0] == json.loads(json.dumps(listed[0]))
    assert set(listed[0]) == {"name", "description", "include", "exclude", "defaults"}


def test_presets_command(tmp_path: Path) -> None:
    result = run("presets", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == list_presets()
    table = run("presets", "pi05")
    assert table.exit_code == 0 and "[qkvo]" in table.stdout and "block=16" in table.stdout
    bad = run("presets", "nope")
    assert bad.exit_code == 1 and "unknown preset 'nope'" in bad.stderr


@pytest.fixture(scope="module")
def full_pack(pi05, tmp_path_factory) -> Path:
    """Every linear layer of the toy packed (more than the preset holds), at w4a8."""
    out = tmp_path_factory.mktemp("packs") / "all"
    sel = Selection(exclude=("embed",), default_exclude=False)  # embeddings are not nn.Linear
    pack(pi05[1], out, config=QuantConfig(), selection=sel)
    return out


def test_load_packed_with_preset_replaces_exactly_those(pi05, full_pack: Path) -> None:
    assert len(Pack.open(full_pack).layers) == len(linear_names(pi05[0]))
    model = fresh(pi05)
    report = load_packed(model, full_pack, preset="pi05", verify_source=True)
    assert sorted(report.replaced) == sorted(EXPECTED)
    replaced = [n for n, m in model.named_modules() if isinstance(m, DuQuantLinear)]
    assert sorted(replaced) == sorted(EXPECTED)
    assert sorted(linear_names(model)) == sorted(set(linear_names(pi05[0])) - set(EXPECTED))
    skipped = dict(report.skipped)
    assert sorted(skipped) == sorted(set(linear_names(pi05[0])) - set(EXPECTED))
    assert skipped["action_in_proj"] == "action_in_proj: not a layer of preset pi05"
    x = torch.randn(5, LM)
    name = f"{LM_PREFIX}.1.mlp.gate_proj"
    with torch.no_grad():
        fp = pi05[0].get_submodule(name)(x)
        assert rel_err(model.get_submodule(name)(x), fp) < 0.2


def test_load_packed_without_preset_replaces_the_whole_pack(pi05, full_pack: Path) -> None:
    report = load_packed(fresh(pi05), full_pack)
    assert sorted(report.replaced) == sorted(linear_names(pi05[0]))


def test_load_packed_refuses_a_pack_without_preset_layers(pi05, tmp_path: Path) -> None:
    out = tmp_path / "vision"
    pack(pi05[1], out, selection=Selection(include=("vision_tower",)))
    model = fresh(pi05)
    with pytest.raises(MismatchError, match=r"none of the pack's 12 layers is in preset pi05$"):
        load_packed(model, out, preset="pi05")
    assert not any(isinstance(m, DuQuantLinear) for m in model.modules())
    with pytest.raises(ConfigError, match="unknown preset"):
        load_packed(model, out, preset="nope")


def test_worked_example_of_docs_pi05(pi05, tmp_path: Path) -> None:
    """docs/pi05.md steps 1-4 on the toy: statistics over a few observations, an
    activation-aware pack of the preset's layers, load with the preset, status, action error."""
    preset = get_preset("pi05")
    model = fresh(pi05).eval()
    g = torch.Generator().manual_seed(1)

    def batch() -> dict[str, torch.Tensor]:
        return {
            "prefix": torch.randn(2, 6, LM, generator=g),
            "actions": torch.randn(2, 5, 7, generator=g),
        }

    calib = [batch() for _ in range(4)]
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and preset.matches(n)]
    stats = collect_stats(model, calib, layers=layers, max_rows=256)
    out = tmp_path / "pi05-w4a8"
    summary = pack(
        pi05[1],
        out,
        selection=preset.selection(),
        config=preset.config(calibrated_config()),
        stats=stats,
    )
    assert sorted(r.name for r in summary.layers) == sorted(EXPECTED)
    assert Pack.open(out).config.calibrated
    qmodel = fresh(pi05).eval()
    report = load_packed(qmodel, out, preset="pi05", verify_source=True)
    assert sorted(report.replaced) == sorted(EXPECTED)
    rows = status(qmodel)
    assert len(rows) == len(EXPECTED)
    assert all(r["cached"] and r["activations"] == "dynamic" for r in rows)
    held_out = batch()
    with torch.no_grad():
        a_fp, a_q = model(**held_out), qmodel(**held_out)
    assert 0 < rel_err(a_q, a_fp) < 0.2


def test_pack_cli_with_preset(pi05, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    result = run("pack", pi05[1], "--preset", "pi05", "-o", out, "--exclude", r"layers\.1\.")
    assert result.exit_code == 0, result.output
    pack_ = Pack.open(out)
    assert sorted(pack_.layers) == sorted(n for n in EXPECTED if ".layers.1." not in n)
    assert pack_.manifest["selection"]["include"] == list(PI05.include)
    assert pack_.manifest["selection"]["exclude"] == [*PI05.exclude, r"layers\.1\."]
    bad = run("pack", pi05[1], "--preset", "pi0", "-o", tmp_path / "bad")
    assert bad.exit_code == 1 and "unknown preset 'pi0'" in bad.stderr


def test_pack_cli_preset_defaults_yield_to_typed_options(pi05, tmp_path, monkeypatch) -> None:
    """A preset whose defaults differ from the CLI's: they apply to options left alone, and an
    option typed with its default value still wins."""
    odd = Preset("odd", "test", PI05.include, PI05.exclude, {"precision": "w8a8", "block": 8})
    monkeypatch.setattr("duquant_cli.cli.presets.get_preset", lambda name: odd)
    run("pack", pi05[1], "--preset", "odd", "-o", tmp_path / "a")
    cfg = Pack.open(tmp_path / "a").config
    assert (str(cfg.precision), cfg.block) == ("w8a8", 8)
    run("pack", pi05[1], "--preset", "odd", "-o", tmp_path / "b", "--block", "16")
    cfg = Pack.open(tmp_path / "b").config
    assert (str(cfg.precision), cfg.block) == ("w8a8", 16)
