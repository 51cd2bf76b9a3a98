"""benchmarks/run_all.py: every benchmark script's figures in one table."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# benchmarks/ is not an installed package: load run_all.py from this checkout
_spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
assert _spec is not None and _spec.loader is not None
run_all = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_all)

FAKE = """\
import json, sys
assert sys.argv[1:] == {expected!r}, sys.argv
print("some progress output")
print(json.dumps({{"tables": [
    {{"title": "speed, 1 thread", "columns": ["what", "speed", "memory"],
      "rows": [["loop", "3.5 it/s", 120.0], ["eval", "-", 80.0]]}},
    {{"title": "sizes", "columns": ["run", "bytes"], "rows": [["val", 42]]}}]}}))
"""


def _script(path: Path, expected: list[str], body: str = FAKE) -> Path:
    path.write_text(body.format(expected=expected))
    return path


def test_figures_of_all_scripts_in_one_table(tmp_path: Path, capsys: pytest.CaptureFixture):
    scripts = {
        "a": _script(tmp_path / "a.py", ["--json", "--quick"]),
        "b": _script(tmp_path / "b.py", ["--json", "--quick"]),
    }
    assert run_all.main(["--quick", "--json"], scripts) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = [["loop: speed", "3.5 it/s"], ["loop: memory", 120.0], ["eval: memory", 80.0],
            ["val: bytes", 42]]  # fmt: skip
    assert out["figures"] == [[name, *r] for name in ("a", "b") for r in rows]  # "-" left out
    assert out["notes"] == ["a: speed, 1 thread", "a: sizes", "b: speed, 1 thread", "b: sizes"]
    assert run_all.main(["--quick"], scripts) == 0
    printed = capsys.readouterr().out
    assert "loop: speed" in printed and "3.5 it/s" in printed and "- b: sizes" in printed


def test_a_failing_script_is_reported_and_the_others_still_run(
    tmp_path: Path, capsys: pytest.CaptureFixture
):
    scripts = {
        "bad": _script(tmp_path / "bad.py", [], "raise SystemExit('out of memory')"),
        "good": _script(tmp_path / "good.py", ["--json"]),
        "silent": _script(tmp_path / "silent.py", [], "print('no json')"),
    }
    assert run_all.main(["--json"], scripts) == 1
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out["failed"]) == {"bad", "silent"}
    assert "out of memory" in out["failed"]["bad"]
    assert ["bad", "FAILED", "exit code 1: out of memory"] in out["figures"]
    assert ["good", "val: bytes", 42] in out["figures"]


def test_only_and_paper_choose_scripts_and_options(tmp_path: Path, capsys):
    scripts = {
        "warmup_eval": _script(tmp_path / "w.py", ["--json", "--paper"]),
        "other": _script(tmp_path / "o.py", ["never run"]),
    }
    assert run_all.main(["--only", "warmup_eval", "--paper", "--json"], scripts) == 0
    with pytest.raises(SystemExit):
        run_all.main(["--only", "nope"], scripts)
    assert "unknown benchmark 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_every_real_benchmark_runs_in_quick_mode(tmp_path: Path):
    """Tiny sizes: this checks the scripts and their JSON, it measures nothing."""
    done = subprocess.run(
        [sys.executable, "benchmarks/run_all.py", "--quick", "--json"], cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["failed"] == {}
    names = {row[0] for row in out["figures"]}
    assert names == {"warmup_eval", "pseudolabel", "embed_report", "cpsl", "methods"}
    figures = {(row[0], row[1]) for row in out["figures"]}
    assert ("warmup_eval", "demo warmup (pixcli loop): speed") in figures
    assert ("cpsl", "CPSL iteration (2 + 2 images, 32x32): time / iteration") in figures
    assert ("methods", "pgpc: vs none") in figures
