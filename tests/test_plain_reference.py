"""benchmarks/plain_reference.py (the floor) and the diagnostic that runs its loop on a pixcli
checkpoint: they run end to end on the tiny benchmark and report what they say."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's benchmarks/
from benchmarks import plain_loop_on_checkpoint, plain_reference  # noqa: E402

SCRIPTS = {
    "plain_reference.py": plain_reference,
    "plain_loop_on_checkpoint.py": plain_loop_on_checkpoint,
}


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """Run a script's main() in this process with ``args``; its last stdout line as JSON."""

    def call(script: str, *args: str) -> dict:
        monkeypatch.setattr(sys, "argv", [script, *args])
        SCRIPTS[script].main()
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    return call


def test_plain_reference_reports_every_model_and_the_gap_share(
    tiny_bench: Path, tmp_path: Path, run
):
    data = ["--source", f"gta5:{tiny_bench / 'source'}", "--target",
            f"cityscapes:{tiny_bench / 'target'}"]  # fmt: skip
    budget = ["--iterations", "3", "--adapt-iterations", "2", "--batch", "2", "--crop", "32"]
    result = run("plain_reference.py", *data, *budget, "--out", str(tmp_path / "r.json"))
    assert set(result) == {"source_only", "oracle", "self_training", "gap_share"}
    assert all(0.0 <= result[k] <= 100.0 for k in ("source_only", "oracle", "self_training"))
    gap = result["oracle"] - result["source_only"]
    share = (result["self_training"] - result["source_only"]) / gap if gap else 0.0
    assert abs(result["gap_share"] - share) < 1e-9
    saved = json.loads((tmp_path / "r.json").read_text())
    assert len(saved["oracle"][1]) == 19  # per-class IoU


def test_plain_loop_on_a_checkpoint_starts_from_its_score(tiny_bench: Path, warm: Path, run):
    data = ["--source", f"gta5:{tiny_bench / 'source'}", "--target",
            f"cityscapes:{tiny_bench / 'target'}"]  # fmt: skip
    common = ["--checkpoint", str(warm), *data, "--batch", "2", "--crop", "32"]
    still = run("plain_loop_on_checkpoint.py", *common, "--iterations", "0")
    assert still["before"] == still["student"] == still["teacher"]  # no step: nothing moves
    moved = run("plain_loop_on_checkpoint.py", *common, "--iterations", "2")
    assert moved["before"] == still["before"]
