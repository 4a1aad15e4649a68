"""The shared table model: a live model (`render_status`) and a pack (`inspect`) read alike."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

import duquant_cli
from duquant_cli.commands.inspect import inspect_pack
from duquant_cli.commands.report import (
    COLUMNS,
    INSPECT_COLUMNS,
    STATUS_COLUMNS,
    human_bytes,
    rows_table,
)
from duquant_cli.runtime.loader import load_packed
from duquant_cli.runtime.status import status
from tests.commands.kinds import build, model_for
from tests.helpers import SMALL_LINEARS, small_state

SHARED = ("name", "shape", "precision", "activations", "row_rot")


def _text(table) -> str:
    buf = io.StringIO()
    Console(width=250, file=buf).print(table)
    return buf.getvalue()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory):
    p = build("static", tmp_path_factory.mktemp("k"))
    model = model_for(small_state())
    load_packed(model, p, backend="dense")
    return p, model


def test_shared_columns_render_the_same_cells(loaded) -> None:
    p, model = loaded
    live = {r["name"]: r for r in status(model)}
    for row in inspect_pack(p).layers:
        for key in SHARED:
            assert COLUMNS[key].cell(row) == COLUMNS[key].cell(live[row["name"]]), key
    assert set(SHARED) <= set(INSPECT_COLUMNS) & set(STATUS_COLUMNS)


def test_render_status(loaded) -> None:
    _, model = loaded
    text = _text(duquant_cli.render_status(model))
    assert "duquant status" in text
    for header in ("layer", "backend", "cached", "activations", "bytes"):
        assert header in text
    for name in SMALL_LINEARS:
        line = next(ln for ln in text.splitlines() if name in ln)
        assert "dense" in line and "static (calibrated, p99.9)" in line and "True" in line


def test_missing_cells_show_dash() -> None:
    text = _text(rows_table([{"name": "a.b", "shape": [2, 3]}], INSPECT_COLUMNS))
    line = next(ln for ln in text.splitlines() if "a.b" in ln)
    assert "2x3" in line and line.split().count("-") == len(INSPECT_COLUMNS) - 2


@pytest.mark.parametrize(
    ("n", "text"),
    [(None, None), (0, "0 B"), (999, "999 B"), (1000, "1.0 kB"), (74_442_240, "74.4 MB"),
     (3 * 10**12, "3,000.0 GB")],
)  # fmt: skip
def test_human_bytes(n, text) -> None:
    assert human_bytes(n) == text


def test_public_names_resolve_lazily() -> None:
    for name in duquant_cli.__all__:
        assert getattr(duquant_cli, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        duquant_cli.nope  # noqa: B018
