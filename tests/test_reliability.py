"""Kill -9 and rerun: warmup, pseudolabel and adapt, each killed with SIGKILL at three points,
then rerun with the same command, end with the artifacts of an uninterrupted run (weights to
1e-6, pseudo.h5 datasets equal) and leave no temporary file behind. Slow (subprocesses)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pixcli.artifacts import load_checkpoint
from pixcli.cli import app

pytestmark = pytest.mark.slow
runner = CliRunner()
COMMON = ("--device", "cpu", "--set", "num_workers=1", "--set", "augment.crop_size=[32, 32]")


def _warmup(bench: Path, out: Path) -> list[str]:
    return [
        "warmup", "--source", f"gta5:{bench / 'source'}", "--out", str(out), "--iterations", "8",
        "--batch-size", "2", "--backbone", "test_resnet", "--set", "model.feature_dim=8",
        "--set", "loop.checkpoint_every=2", "--set", "loop.log_every=1", *COMMON,
    ]  # fmt: skip


def _adapt(bench: Path, ckpt: Path, out: Path) -> list[str]:
    return [
        "adapt", "--method", "none", "--checkpoint", str(ckpt), "--out", str(out),
        "--source", f"gta5:{bench / 'source'}", "--target", f"cityscapes:{bench / 'target'}",
        "--iterations", "8", "--batch-size", "2", "--set", "loop.checkpoint_every=2",
        "--set", "loop.log_every=1", *COMMON,
    ]  # fmt: skip


def _pseudolabel(bench: Path, ckpt: Path, out: Path) -> list[str]:
    return [
        "pseudolabel", "--checkpoint", str(ckpt), "--target", f"cityscapes:{bench / 'target'}",
        "--out", str(out), "--device", "cpu", "--set", "num_workers=1",
    ]  # fmt: skip


def _run(args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output


def _logged_steps(out: Path) -> int:
    log = out / "train_log.jsonl"
    return len(log.read_text().splitlines()) if log.is_file() else 0


def _kill_when(args: list[str], ready: Callable[[], bool], timeout: float = 300) -> None:
    """Start ``pixcli args`` in a subprocess and SIGKILL it as soon as ``ready()``."""
    proc = subprocess.Popen([sys.executable, "-m", "pixcli", *args], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not ready() and time.monotonic() < deadline:
        time.sleep(0.01)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = load_checkpoint(a)["state_dict"], load_checkpoint(b)["state_dict"]
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.allclose(wa[key].double(), wb[key].double(), atol=1e-6, rtol=0), key


def _no_temporaries(out: Path) -> None:
    assert not [p for p in out.rglob("*.tmp")], sorted(out.rglob("*.tmp"))


@pytest.fixture(scope="module")
def reference(tiny_bench: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Uninterrupted runs of the three stages."""
    root = tmp_path_factory.mktemp("reference")
    _run(_warmup(tiny_bench, root / "warmup"))
    ckpt = root / "warmup" / "model.pt"
    _run(_pseudolabel(tiny_bench, ckpt, root / "pseudo"))
    _run(_adapt(tiny_bench, ckpt, root / "adapt"))
    return {"warmup": root / "warmup", "pseudo": root / "pseudo", "adapt": root / "adapt"}


@pytest.mark.parametrize("kill_after", [1, 3, 6])
def test_killed_warmup_reruns_to_the_same_weights(
    tiny_bench: Path, reference: dict[str, Path], tmp_path: Path, kill_after: int
):
    out = tmp_path / "w"
    _kill_when(_warmup(tiny_bench, out), lambda: _logged_steps(out) >= kill_after)
    _run(_warmup(tiny_bench, out))
    _same_weights(out / "model.pt", reference["warmup"] / "model.pt")
    assert _logged_steps(out) == _logged_steps(reference["warmup"])  # each step once
    _no_temporaries(out)


@pytest.mark.parametrize("kill_after", [1, 3, 6])
def test_killed_adapt_reruns_to_the_same_weights(
    tiny_bench: Path, reference: dict[str, Path], tmp_path: Path, kill_after: int
):
    out = tmp_path / "a"
    ckpt = reference["warmup"] / "model.pt"
    _kill_when(_adapt(tiny_bench, ckpt, out), lambda: _logged_steps(out) >= kill_after)
    _run(_adapt(tiny_bench, ckpt, out))
    _same_weights(out / "model.pt", reference["adapt"] / "model.pt")
    _no_temporaries(out)


@pytest.mark.parametrize("delay", [0.0, 0.3, 1.0])
def test_killed_pseudolabel_reruns_to_the_same_file(
    tiny_bench: Path, reference: dict[str, Path], tmp_path: Path, delay: float
):
    out = tmp_path / "p"
    ckpt = reference["warmup"] / "model.pt"
    seen: list[float] = []

    def ready() -> bool:  # ``delay`` seconds after the work file appeared
        if not any(out.glob("pseudo.part*.h5")):
            return False
        seen.append(seen[0] if seen else time.monotonic())
        return time.monotonic() - seen[0] >= delay

    _kill_when(_pseudolabel(tiny_bench, ckpt, out), ready)
    _run(_pseudolabel(tiny_bench, ckpt, out))
    with h5py.File(out / "pseudo.h5") as got, h5py.File(reference["pseudo"] / "pseudo.h5") as ref:
        assert set(got) == set(ref)
        for name in ref:
            assert np.array_equal(got[name][()], ref[name][()]), name
    _no_temporaries(out)
