"""Property: whatever is done to a valid pack's bytes, JSON or tensor headers, every read either
succeeds or raises the project's own error (DuQuantError), never anything else.

The read path is everything that opens a pack: `Pack.open`, `Pack.load` of every layer,
`DuQuantLinear.from_pack`, `inspect_pack` (manifest only) and `verify_pack` (every tensor).
Four strategies (flipped/overwritten bytes, truncation, manifest JSON edits, safetensors header
edits) over three pristine packs; 4,000 cases in the default run (about 25 s).
DUQUANT_FUZZ_EXAMPLES=N runs N per strategy with random seeds, for a longer hunt.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import traceback
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from duquant_cli.commands.inspect import inspect_pack
from duquant_cli.commands.verify import verify_pack
from duquant_cli.errors import DuQuantError
from duquant_cli.formats.pack import MANIFEST, Pack
from duquant_cli.runtime.layer import DuQuantLinear
from tests.commands.kinds import build

KINDS = ("static", "mixed", "calibrated")  # two shards + per-tensor files; groups/zero/w16; in1
_EXAMPLES = int(os.environ.get("DUQUANT_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=_EXAMPLES or 1000,
    deadline=None,
    database=None,
    derandomize=not _EXAMPLES,  # the default run is the same every time
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pristine")
    return {kind: build(kind, root) for kind in KINDS}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mutated")


def read_everything(path: Path) -> None:
    """Every reader, start to end; the manifest-only inspect first (it never imports torch)."""
    inspect_pack(path)
    pack = Pack.open(path)
    for name, entry in pack.layers.items():
        tensors = pack.load(name)
        DuQuantLinear.from_pack(entry, tensors, bias=None)
    verify_pack(path)


def check(path: Path, what: str) -> None:
    try:
        read_everything(path)
        event("read back")
    except DuQuantError as exc:
        event(f"refused: {type(exc).__name__}")
        msg = str(exc)
        assert msg and "\n" not in msg, f"{what}: multi-line or empty message {msg!r}"
    except Exception as exc:  # the property: nothing but the project's errors
        tb = "".join(traceback.format_exception(exc, limit=-4))
        pytest.fail(f"{what}: {type(exc).__name__} escaped the readers:\n{tb}")


def fresh_copy(src: Path, scratch: Path) -> Path:
    dst = scratch / "p"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def files_of(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file())


# -- bytes ---------------------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_flipped_and_overwritten_bytes(pristine, scratch, data) -> None:
    path = fresh_copy(pristine[data.draw(st.sampled_from(KINDS))], scratch)
    target = data.draw(st.sampled_from(files_of(path)))
    raw = bytearray(target.read_bytes())
    # headers and the manifest's start are where structure lives: bias positions toward them;
    # a shard's data region reads back as garbage values, which the layers must survive too
    start = 0
    if target.name != MANIFEST and data.draw(st.booleans()):
        start = 8 + struct.unpack("<Q", raw[:8])[0]
    hot = st.integers(start, min(len(raw) - 1, start + 400))
    edits = data.draw(
        st.lists(
            st.tuples(st.one_of(hot, st.integers(start, len(raw) - 1)), BLOBS),
            min_size=1,
            max_size=6,
        )
    )
    for pos, new in edits:
        raw[pos : pos + len(new)] = new
    target.write_bytes(bytes(raw))
    check(path, f"{target.name} edited at {[p for p, _ in edits]}")


@FUZZ
@given(data=st.data())
def test_truncated_files(pristine, scratch, data) -> None:
    path = fresh_copy(pristine[data.draw(st.sampled_from(KINDS))], scratch)
    target = data.draw(st.sampled_from(files_of(path)))
    raw = target.read_bytes()
    cut = data.draw(st.one_of(st.integers(0, 300), st.integers(0, len(raw))))
    target.write_bytes(raw[:cut])
    check(path, f"{target.name} cut to {cut} of {len(raw)} bytes")


# -- manifest JSON ---------------------------------------------------------------------------------

# strings the readers give meaning to
WORDS = [
    *("float32", "int64", "uint8", "float64", "bool", "w4a8", "w16a16", "sym", "restore"),
    *("propagate", "dynamic", "static", "../manifest.json", ""),
    *("tensors-00001.safetensors", "tensors-00002.safetensors", "tensors-99999.safetensors"),
]
BLOBS = st.binary(min_size=1, max_size=32)
PACK_DTYPES = ["float32", "int64", "uint8", "float16", "bfloat16", "int8", "int32", "float64"]
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, -1, 2**31, 2**40 + 1, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(WORDS),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=8,
)
shapes = st.lists(
    st.one_of(st.integers(0, 64), st.sampled_from([-1, 2**31, 2**40, 2**62, 10**20])), max_size=4
)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into the JSON tree (keys and list indices)."""
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _get(node: Any, path: tuple) -> Any:
    for p in path:
        node = node[p]
    return node


def _refs(layer: Any) -> dict:
    """A layer's tensor records, when an earlier edit left them in shape to be edited."""
    tensors = layer.get("tensors") if isinstance(layer, dict) else None
    if not isinstance(tensors, dict):
        return {}
    return {f: t for f, t in tensors.items() if isinstance(t, dict)}


def mutate_json(manifest: Any, data: st.DataObject) -> str:
    """One edit somewhere in the manifest; returns a description."""
    raw = manifest.get("layers") if isinstance(manifest, dict) else None
    layers = [d for d in raw if _refs(d)] if isinstance(raw, list) else []
    action = data.draw(
        st.sampled_from(["replace", "delete", "shape", "dtype", "key", "file", "dup", "swap"])
    )
    if action in ("shape", "dtype", "key", "file") and layers:
        layer = data.draw(st.sampled_from(layers))
        field = data.draw(st.sampled_from(sorted(_refs(layer))))
        ref = _refs(layer)[field]
        if action == "shape":
            ref["shape"] = data.draw(shapes)
        elif action == "dtype":
            ref["dtype"] = data.draw(st.sampled_from(PACK_DTYPES))
        elif action == "key":
            other = _refs(data.draw(st.sampled_from(layers)))
            ref["key"] = data.draw(st.sampled_from([*(t.get("key") for t in other.values()), ""]))
        else:
            ref["file"] = data.draw(json_scalars)
        return f"{action} {layer.get('name')!r}.{field} -> {ref.get(action, ref)!r}"
    if action == "dup" and layers:
        raw.append(json.loads(json.dumps(data.draw(st.sampled_from(layers)))))
        raw[-1]["name"] = data.draw(st.sampled_from([layers[0].get("name"), "copy"]))
        return "duplicated a layer"
    if action == "swap" and len(layers) > 1:
        a, b = data.draw(st.permutations(layers))[:2]
        a["tensors"], b["tensors"] = b["tensors"], a["tensors"]
        return "swapped the tensors of two layers"
    paths = [p for p in _paths(manifest) if p]
    if not paths:
        return "nothing left to edit"
    path = data.draw(st.sampled_from(paths))
    parent = _get(manifest, path[:-1])
    if action == "delete":
        del parent[path[-1]]
        return f"deleted {path}"
    parent[path[-1]] = data.draw(json_values)
    return f"replaced {path} with {parent[path[-1]]!r}"


@FUZZ
@given(data=st.data())
def test_manifest_json_edits(pristine, scratch, data) -> None:
    path = fresh_copy(pristine[data.draw(st.sampled_from(KINDS))], scratch)
    manifest = json.loads((path / MANIFEST).read_text())
    what = [mutate_json(manifest, data) for _ in range(data.draw(st.integers(1, 3)))]
    (path / MANIFEST).write_text(json.dumps(manifest))
    check(path, "; ".join(what))


# -- safetensors headers ---------------------------------------------------------------------------


def _split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


@FUZZ
@given(data=st.data())
def test_tensor_header_edits(pristine, scratch, data) -> None:
    """Well-formed headers that lie: shapes, dtypes, offsets, lengths, missing or extra keys."""
    path = fresh_copy(pristine[data.draw(st.sampled_from(KINDS))], scratch)
    target = data.draw(st.sampled_from(sorted(path.glob("tensors-*.safetensors"))))
    header, body = _split(target.read_bytes())
    key = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    action = data.draw(st.sampled_from(["shape", "dtype", "offsets", "delete", "value", "len"]))
    if action == "shape":
        header[key]["shape"] = data.draw(shapes)
    elif action == "dtype":
        header[key]["dtype"] = data.draw(
            st.sampled_from(["F32", "F16", "BF16", "I64", "I32", "U8", "I8", "F64", "BOOL", "X"])
        )
    elif action == "offsets":
        header[key]["data_offsets"] = data.draw(
            st.lists(st.one_of(st.integers(0, len(body) + 8), st.integers(-5, 2**64)), max_size=3)
        )
    elif action == "delete":
        del header[key]
    else:
        header[key] = data.draw(json_values)
    text = json.dumps(header).encode()
    length = len(text)
    if action == "len":
        length = data.draw(st.one_of(st.integers(0, length + 64), st.integers(0, 2**64 - 1)))
    target.write_bytes(struct.pack("<Q", length) + text + body)
    check(path, f"{target.name}: {action} of {key!r}")
