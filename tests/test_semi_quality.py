"""benchmarks/semi_quality.py: its tables from a work directory of finished runs (no training:
the runs' metrics.json written by hand), and its option parsing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's benchmarks/
from benchmarks import semi_quality  # noqa: E402


def _metrics(path: Path, miou: float, road: float | None) -> None:
    path.mkdir(parents=True)
    per_class = {"road": {"IoU": road}, "wall": {"IoU": None}, "sky": {"IoU": 50.0}}
    (path / "metrics.json").write_text(json.dumps({"mIoU": miou, "per_class": per_class}))


@pytest.fixture
def study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> semi_quality.SemiStudy:
    monkeypatch.setattr(sys, "argv", ["semi_quality.py", "--work", str(tmp_path), "--seeds", "2",
                                      "--models", "none", "--table-only"])  # fmt: skip
    return semi_quality.SemiStudy(semi_quality.arguments())


def test_split_table_gap_share_per_seed_and_mean_std(study: semi_quality.SemiStudy, tmp_path):
    # seed 0: labelled 30, upper 40, UniMatch 34 -> 40 %; seed 1: 32, 40, 38 -> 75 %
    for seed, (lab, none, upper) in enumerate(((30.0, 34.0, 40.0), (32.0, 38.0, 40.0))):
        d = tmp_path / f"seed{seed}"
        _metrics(d / "eval-1_30-labelled-only", lab, 60.0)
        _metrics(d / "eval-1_30-none", none, 70.0 + seed)
        _metrics(d / "eval-1_30-all-labelled", upper, None)
    columns, rows, raw = semi_quality.split_table(study, 0.0333)
    # wall: not in the benchmark (no IoU in any run), not a column
    assert columns == ["model", "seeds", "mIoU", "gap closed %", "road", "sky"]
    assert rows[1] == ["none", "2", "36.0 ± 2.8", "57.5 ± 24.7", "70.5", "50.0"]
    assert rows[0][3] == "0.0 ± 0.0" and rows[2][3] == "100.0 ± 0.0"
    assert rows[2][4] == "-"  # a class without an IoU in a run
    assert raw["none"]["gap_share"] == [40.0, 75.0]


def test_curve_rows_and_the_splits_it_picks(study: semi_quality.SemiStudy, tmp_path):
    d = tmp_path / "seed0"
    for name, miou in (("1_30", 30.0), ("1_16", 36.5), ("1_8", 38.0), ("1_1", 42.0)):
        _metrics(d / f"eval-warmup-{name}", miou, 1.0)
    (d / "warmup-1_30").mkdir()
    (d / "warmup-1_30" / "labelled.txt").write_text("a\nb\n")
    rows = semi_quality.curve_rows(study)
    assert [r[0] for r in rows] == ["1/30", "1/16", "1/8"]
    assert rows[0][1:] == [2, 30.0, 42.0, 12.0] and rows[1][1] == "-"
    assert study.splits() == [0.0333]  # 1/16's gap is 5.5, under --min-gap 6


def test_split_names_and_variants():
    assert [semi_quality.split_name(f) for f in (0.0333, 0.0625, 0.125, 1.0)] == [
        "1_30", "1_16", "1_8", "1_1"]  # fmt: skip
    variants = semi_quality.parse_variants(["ipix-a1:ipixmatch:ipixmatch.alpha=1,ipixmatch.tau=0.9",
                                            "plain:none"])  # fmt: skip
    assert variants == {
        "ipix-a1": ("ipixmatch", ["--set", "ipixmatch.alpha=1", "--set", "ipixmatch.tau=0.9"]),
        "plain": ("none", []),
    }


def test_the_colour_rows_run_their_method_with_recoloured_labelled_crops(
    study: semi_quality.SemiStudy, monkeypatch: pytest.MonkeyPatch
):
    commands: list[list[str]] = []
    monkeypatch.setattr(study, "run", lambda cmd, log: commands.append(cmd))
    study.adapt_run(2, 0.0333, "ipixmatch-colour")
    adapt = commands[0]
    assert adapt[adapt.index("--method") + 1] == "ipixmatch"
    assert "self_training.target_colour_stats=1.0" in adapt
    assert adapt[adapt.index("--out") + 1].endswith("seed2/1_30-ipixmatch-colour")
    commands.clear()
    study.adapt_run(0, 0.0333, "labelled-only")  # no unlabelled stream: nothing to recolour to
    assert "self_training.target_colour_stats=1.0" not in commands[0]


def test_style_reaches_make_benchmark(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(sys, "argv", ["semi_quality.py", "--work", str(tmp_path), "--style", "dusk",
                                      "--bench-seed", "1"])  # fmt: skip
    study = semi_quality.SemiStudy(semi_quality.arguments())
    commands: list[list[str]] = []
    monkeypatch.setattr(study, "run", lambda cmd, log: commands.append(cmd))
    study.prepare()
    (cmd,) = commands
    assert cmd[cmd.index("--style") + 1] == "dusk"
    assert cmd[cmd.index("--seed") + 1] == "1"
    assert cmd[cmd.index("make-benchmark") + 1] == str(tmp_path / "benchmark")


def test_another_style_gets_its_own_default_work_directory(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(sys, "argv", ["semi_quality.py", "--style", "dusk", "--bench-seed", "1"])
    assert semi_quality.arguments().work.name == "semi-quality-dusk-1"
    monkeypatch.setattr(sys, "argv", ["semi_quality.py", "--bench-seed", "1"])
    assert semi_quality.arguments().work.name == "semi-quality-1"
