"""Determinism, resume after an interrupt (in-process and a real SIGKILL), and one writer."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import duquant_cli.commands.pack as cmd
from duquant_cli.cli import app
from duquant_cli.commands.pack import pack
from duquant_cli.commands.verify import verify_pack
from duquant_cli.config import QuantConfig
from duquant_cli.errors import PackError
from duquant_cli.formats.pack import JOURNAL, MANIFEST, Pack, PackWriter
from tests.commands.kinds import small_stats
from tests.helpers import hidden_leftovers, small_state, write_safetensors
from tests.snapshots import diff, layered_checkpoint, pack_bytes, slow_pack_cmd, tree

SHARD = 6000  # bytes: ten small layers make three or four shards
N = 10
REAL_BUILD = cmd.build_layer


@pytest.fixture
def small_shards(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setitem(PackWriter.__init__.__kwdefaults__, "shard_bytes", SHARD)
    return SHARD


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return layered_checkpoint(tmp_path / "src" / "m.safetensors", N)


@pytest.fixture
def clean(tmp_path: Path, ckpt: Path, small_shards: int) -> dict[str, bytes]:
    """The uninterrupted run's files (manifest without its time)."""
    pack(ckpt, tmp_path / "clean")
    return pack_bytes(tmp_path / "clean")


def interrupt_at(monkeypatch: pytest.MonkeyPatch, layer: int) -> None:
    """Ctrl-C while building the `layer`-th layer (0-based)."""
    real = cmd.build_layer
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == layer + 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(cmd, "build_layer", flaky)


def journal(partial: Path) -> list[dict]:
    return [json.loads(line) for line in (partial / JOURNAL).read_text().splitlines()]


def test_same_inputs_give_the_same_bytes(tmp_path: Path, ckpt: Path, small_shards: int) -> None:
    cfg = QuantConfig(block=8, seed=3)
    pack(ckpt, tmp_path / "a", config=cfg)
    pack(ckpt, tmp_path / "b", config=cfg)
    a, b = pack_bytes(tmp_path / "a"), pack_bytes(tmp_path / "b")
    assert len([n for n in a if n.startswith("tensors-")]) >= 3
    assert a == b  # every shard byte for byte, the manifest but for `created`
    pack(ckpt, tmp_path / "c", config=QuantConfig(block=8, seed=4))
    c = pack_bytes(tmp_path / "c")
    assert a.keys() == c.keys() and a["tensors-00001.safetensors"] != c["tensors-00001.safetensors"]


@pytest.mark.parametrize("layer", [1, 3, 4, 7, N - 1])
def test_resume_after_interrupt_is_byte_identical(
    tmp_path: Path, ckpt: Path, clean: dict[str, bytes], monkeypatch, layer: int
) -> None:
    out = tmp_path / "out"
    interrupt_at(monkeypatch, layer)
    with pytest.raises(KeyboardInterrupt):
        pack(ckpt, out)
    assert not out.exists()
    partial = tmp_path / ".out.partial"
    assert hidden_leftovers(tmp_path) == [".out.partial"]  # the lock is gone
    assert [r["name"] for r in journal(partial) if "index" in r] == [
        f"layers.{i:02d}.proj" for i in range(layer)
    ]
    built = []
    monkeypatch.setattr(
        cmd, "build_layer", lambda n, *a, **k: built.append(n) or REAL_BUILD(n, *a, **k)
    )
    summary = pack(ckpt, out, resume=True)
    assert summary.resumed == layer
    assert built == [f"layers.{i:02d}.proj" for i in range(layer, N)]  # only the rest is redone
    assert [r.name for r in summary.layers] == [f"layers.{i:02d}.proj" for i in range(N)]
    assert pack_bytes(out) == clean
    assert hidden_leftovers(tmp_path) == []


@pytest.mark.parametrize("layer", [1, 2])
def test_resume_calibrated_pack(tmp_path: Path, small_shards, monkeypatch, layer: int) -> None:
    """An activation-aware pack (layers fed one input share a transform) resumes to the same
    bytes too; interrupted as the writer is handed a layer, whatever built it."""
    ckpt = write_safetensors(tmp_path / "m.safetensors", small_state())
    pack(ckpt, tmp_path / "clean", stats=small_stats())
    real, calls = PackWriter.add, []

    def add(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == layer + 1:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(PackWriter, "add", add)
    with pytest.raises(KeyboardInterrupt):
        pack(ckpt, tmp_path / "out", stats=small_stats())
    monkeypatch.setattr(PackWriter, "add", real)
    assert pack(ckpt, tmp_path / "out", stats=small_stats(), resume=True).resumed == layer
    assert pack_bytes(tmp_path / "out") == pack_bytes(tmp_path / "clean")


def test_resume_keeps_skipped_layers(tmp_path: Path, small_shards, monkeypatch) -> None:
    """--skip-bad records a skipped layer in the journal; a resumed run keeps it skipped."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(layered_checkpoint(tmp_path / "m.safetensors", N)))
    state["layers.02.proj.weight"][0, 0] = float("nan")
    ckpt = tmp_path / "bad.safetensors"
    save_file(state, str(ckpt))
    pack(ckpt, tmp_path / "clean", skip_bad=True)
    interrupt_at(monkeypatch, 5)  # the sixth layer built: the seventh of the plan
    with pytest.raises(KeyboardInterrupt):
        pack(ckpt, tmp_path / "out", skip_bad=True)
    assert any(r.get("skipped") for r in journal(tmp_path / ".out.partial"))
    monkeypatch.setattr(cmd, "build_layer", REAL_BUILD)
    summary = pack(ckpt, tmp_path / "out", skip_bad=True, resume=True)
    assert summary.resumed == 6
    assert summary.skipped == [("layers.02.proj.weight", "1 NaN value(s) in layers.02.proj.weight")]
    assert pack_bytes(tmp_path / "out") == pack_bytes(tmp_path / "clean")
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["skipped"] == [
        {"key": "layers.02.proj.weight", "reason": "1 NaN value(s) in layers.02.proj.weight"}
    ]


def test_interrupt_before_any_layer_leaves_nothing(tmp_path: Path, ckpt: Path, monkeypatch) -> None:
    interrupt_at(monkeypatch, 0)
    with pytest.raises(KeyboardInterrupt):
        pack(ckpt, tmp_path / "out")
    assert hidden_leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def _damage_torn_line(partial: Path) -> None:
    with (partial / JOURNAL).open("a") as fh:
        fh.write('{"index": 99, "name": "layers.0')  # killed mid-write


def _damage_staged(partial: Path) -> None:
    staged = sorted((partial / "layers").iterdir())
    data = bytearray(staged[0].read_bytes())
    data[-1] ^= 0xFF
    staged[0].write_bytes(bytes(data))


def _damage_shard(partial: Path) -> None:
    shard = sorted((partial / "pack").iterdir())[-1]
    shard.write_bytes(shard.read_bytes()[:-10])


def _damage_strays(partial: Path) -> None:
    (partial / "pack" / "tensors-00009.safetensors").write_bytes(b"junk")
    (partial / "layers" / "00042.safetensors.tmp").write_bytes(b"junk")


def _damage_journal_lines(partial: Path) -> None:
    lines = (partial / JOURNAL).read_text().splitlines()
    (partial / JOURNAL).write_text("\n".join(lines[:3]) + "\nnot json\n" + lines[3] + "\n")


@pytest.mark.parametrize(
    "damage",
    [_damage_torn_line, _damage_staged, _damage_shard, _damage_strays, _damage_journal_lines],
)
def test_resume_redoes_what_the_disk_does_not_back(
    tmp_path: Path, ckpt: Path, clean: dict[str, bytes], monkeypatch, damage
) -> None:
    """A torn journal line, a staged layer or shard that fails its hash, stray files: the
    journal's longest prefix the files back is kept; the rest is redone; same bytes."""
    out = tmp_path / "out"
    interrupt_at(monkeypatch, 7)
    with pytest.raises(KeyboardInterrupt):
        pack(ckpt, out)
    partial = tmp_path / ".out.partial"
    assert any("shard" in r for r in journal(partial))  # shards were written before the stop
    assert any((partial / "layers").iterdir())  # and layers are staged after the last one
    damage(partial)
    monkeypatch.setattr(cmd, "build_layer", REAL_BUILD)
    summary = pack(ckpt, out, resume=True)
    assert 0 < summary.resumed <= 7
    assert pack_bytes(out) == clean


def test_partial_needs_resume_or_force(tmp_path: Path, ckpt: Path, small_shards, monkeypatch):
    out = tmp_path / "out"
    interrupt_at(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        pack(ckpt, out)
    monkeypatch.setattr(cmd, "build_layer", REAL_BUILD)
    before = tree(tmp_path)
    with pytest.raises(PackError, match=r"\.out\.partial beside it; pass --resume .* or --force"):
        pack(ckpt, out)
    assert diff(before, tree(tmp_path)) == []
    assert pack(ckpt, out, force=True).resumed == 0  # --force alone starts over
    assert hidden_leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"config": QuantConfig(block=8)}, "config"),
        ({"config": QuantConfig(seed=1)}, "config"),
        ({"skip_bad": True}, "skip_bad"),
        ({"checkpoint": "touched"}, "files"),
    ],
)
def test_resume_refuses_other_inputs(
    tmp_path: Path, ckpt: Path, small_shards, monkeypatch, change: dict, named: str
) -> None:
    out = tmp_path / "out"
    interrupt_at(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        pack(ckpt, out)
    monkeypatch.setattr(cmd, "build_layer", REAL_BUILD)
    kw = {k: v for k, v in change.items() if k != "checkpoint"}
    if "checkpoint" in change:  # same names and shapes, other values
        layered_checkpoint(ckpt, N, seed=1)
    before = tree(tmp_path / ".out.partial")
    with pytest.raises(PackError, match=rf"cannot --resume: .*different .*{named}"):
        pack(ckpt, out, resume=True, **kw)
    assert diff(before, tree(tmp_path / ".out.partial")) == []  # left for a correct --resume


# -- a real kill ---------------------------------------------------------------------------------


def _wait_for(pred, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"child exited early ({proc.returncode}): {out}")
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def _layer_lines(partial: Path) -> int:
    try:
        return sum('"index"' in ln for ln in (partial / JOURNAL).read_text().splitlines())
    except OSError:
        return 0


def test_sigkill_then_resume_is_byte_identical(
    tmp_path: Path, ckpt: Path, clean: dict[str, bytes]
) -> None:
    out = tmp_path / "out"
    argv = slow_pack_cmd(tmp_path / "slow.py", SHARD, 0.15, "pack", ckpt, "-o", out)
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    partial = tmp_path / ".out.partial"
    try:
        _wait_for(lambda: _layer_lines(partial) >= 5, proc=child)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not out.exists()
    lock = tmp_path / ".out.lock"
    assert json.loads(lock.read_text())["pid"] == child.pid  # left behind by the killed run
    done = _layer_lines(partial)
    assert 5 <= done < N
    result = CliRunner().invoke(app, ["pack", str(ckpt), "-o", str(out), "--resume", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["resumed"] >= 5
    assert pack_bytes(out) == clean
    assert hidden_leftovers(tmp_path) == []  # the stale lock was taken over, then released
    assert verify_pack(out).ok


# -- one writer ----------------------------------------------------------------------------------


def _lock(tmp_path: Path, **record) -> Path:
    lock = tmp_path / ".out.lock"
    lock.write_text(json.dumps(record))
    return lock


def _run(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def test_a_live_lock_refuses_a_second_writer(tmp_path: Path, ckpt: Path) -> None:
    _lock(tmp_path, pid=os.getpid(), host=socket.gethostname())
    before = tree(tmp_path)
    result = _run("pack", ckpt, "-o", tmp_path / "out")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert (
        f"{tmp_path / 'out'}: another duquant pack is writing it (pid {os.getpid()} on "
        in (lines[0])
    )
    assert diff(before, tree(tmp_path)) == []


def test_other_host_lock_is_respected(tmp_path: Path, ckpt: Path) -> None:
    _lock(tmp_path, pid=1, host="elsewhere.example")
    result = _run("pack", ckpt, "-o", tmp_path / "out", "--force")
    assert result.exit_code == 1 and "pid 1 on elsewhere.example" in result.stderr
    assert not (tmp_path / "out").exists()


def test_stale_lock_is_taken_over(tmp_path: Path, ckpt: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _lock(tmp_path, pid=dead.pid, host=socket.gethostname(), start="1")
    result = _run("pack", ckpt, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert hidden_leftovers(tmp_path) == []


def test_two_runs_one_output(tmp_path: Path, ckpt: Path, clean: dict[str, bytes]) -> None:
    """A second run aimed at an output being written fails at once and touches nothing; the
    first finishes a whole, valid pack."""
    out = tmp_path / "out"
    argv = slow_pack_cmd(tmp_path / "slow.py", SHARD, 0.1, "pack", ckpt, "-o", out)
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        _wait_for(lambda: _layer_lines(tmp_path / ".out.partial") >= 2, proc=first)
        for extra in ([], ["--force"], ["--resume"]):
            second = _run("pack", ckpt, "-o", out, *extra)
            assert second.exit_code == 1
            assert "another duquant pack is writing it (pid" in second.stderr
            assert len(second.stderr.strip().splitlines()) == 1
    finally:
        output, _ = first.communicate(timeout=300)
    assert first.returncode == 0, output
    assert pack_bytes(out) == clean
    assert hidden_leftovers(tmp_path) == []
    assert Pack.open(out).layers and MANIFEST in os.listdir(out)
