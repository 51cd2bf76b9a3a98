"""benchmarks/methods_quality.py: the commands of a variant and its row in the table, from a
work directory of runs whose metrics.json are written by hand (no training)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's benchmarks/
from benchmarks import methods_quality  # noqa: E402


def _metrics(path: Path, miou: float) -> None:
    path.mkdir(parents=True)
    per_class = {"road": {"IoU": miou}, "sky": {"IoU": 50.0}}
    (path / "metrics.json").write_text(json.dumps({"mIoU": miou, "per_class": per_class}))


@pytest.fixture
def study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> methods_quality.Study:
    monkeypatch.setattr(sys, "argv", [
        "methods_quality.py", "--work", str(tmp_path), "--seeds", "2", "--methods",
        "none,flip", "--variant", "flip:none:self_training.teacher_flip=true,optim.lr=0.002",
        "--no-plain", "--table-only"])  # fmt: skip
    return methods_quality.Study(methods_quality.arguments())


def test_a_variant_runs_its_method_with_its_settings(study: methods_quality.Study, monkeypatch):
    commands: list[list[str]] = []
    monkeypatch.setattr(study, "run", lambda cmd, log: commands.append(cmd))
    study.adapt(1, "flip", Path("warm.pt"), None)
    adapt, evaluate = commands
    assert adapt[adapt.index("--method") + 1] == "none"
    assert adapt[-6:-2] == ["--set", "self_training.teacher_flip=true", "--set", "optim.lr=0.002"]
    assert adapt[adapt.index("--out") + 1].endswith("seed1/adapt-flip")
    assert evaluate[evaluate.index("--out") + 1].endswith("seed1/eval-flip")


def test_the_table_has_a_row_per_variant_with_its_gap_share(study, tmp_path: Path):
    _metrics(tmp_path / "seed0" / "eval-warmup", 20.0)
    _metrics(tmp_path / "seed0" / "eval-oracle", 60.0)
    for seed, (none, flip) in enumerate([(30.0, 32.0), (34.0, 40.0)]):
        _metrics(tmp_path / f"seed{seed}" / "eval-none", none)
        _metrics(tmp_path / f"seed{seed}" / "eval-flip", flip)
    columns, rows, raw = methods_quality.collect(study)
    assert columns == ["model", "seeds", "mIoU", "gap %", "road", "sky"]
    by_name = {r[0]: r for r in rows}
    assert list(by_name) == ["warmup", "none", "flip", "oracle"]
    # flip: 32 and 40 -> 36 ± 5.7; gap shares 30 % and 50 % of the 40-point gap
    assert by_name["flip"][1:4] == ["2", "36.0 ± 5.7", "40.0 ± 14.1"]
    assert raw["none"]["gap_share"] == [25.0, 35.0]


def test_a_distill_variant_is_one_more_round_of_the_cpsl_model_and_its_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(sys, "argv", [
        "methods_quality.py", "--work", str(tmp_path), "--seeds", "1", "--methods", "cpsl",
        "--distill-variant", "colour:self_training.target_colour_stats=1.0",
        "--no-plain"])  # fmt: skip
    study = methods_quality.Study(methods_quality.arguments())
    commands: list[list[str]] = []
    monkeypatch.setattr(study, "run", lambda cmd, log: commands.append(cmd))
    study.method(0, "cpsl", Path("warm.pt"), Path("pseudo.h5"))
    distills = [c for c in commands if "distill" in c]
    assert [c[c.index("--out") + 1].split("/")[-1] for c in distills] == [
        "distill-cpsl", "distill-cpsl-colour"]  # fmt: skip
    assert "--set" not in distills[0][: distills[0].index("--iterations")]
    assert distills[1][-4:-2] == ["--set", "self_training.target_colour_stats=1.0"]
    evals = [c[c.index("--out") + 1].split("/")[-1] for c in commands if "eval" in c]
    assert evals == ["eval-cpsl", "eval-cpsl+distill", "eval-cpsl+distill-colour"]
    for name, miou in [("warmup", 20.0), ("oracle", 60.0), ("cpsl", 30.0),
                       ("cpsl+distill", 32.0), ("cpsl+distill-colour", 34.0)]:  # fmt: skip
        _metrics(tmp_path / "seed0" / f"eval-{name}", miou)
    _, rows, _ = methods_quality.collect(study)
    assert [r[0] for r in rows] == ["warmup", "cpsl", "cpsl+distill", "cpsl+distill-colour",
                                    "oracle"]  # fmt: skip
    assert rows[3][2:4] == ["34.0 ± 0.0", "35.0 ± 0.0"]
    with pytest.raises(SystemExit, match="expected NAME:key=value"):
        methods_quality.parse_distill_variants(["colour"])


def test_the_comparison_bars_are_the_tables_mean_and_std():
    from pixcli.figures import comparison_bars

    runs = {"warmup": [20.0], "none": [30.0, 34.0], "flip": [], "cpsl": [33.0], "oracle": [60.0]}
    bars = comparison_bars(runs)
    assert [b[0] for b in bars] == ["none", "cpsl"]  # bounds and models without runs left out
    name, mean, std, values = bars[0]
    assert (mean, round(std, 3), values) == (32.0, 2.828, [30.0, 34.0])  # sample std: sqrt(8)
    assert bars[1][1:3] == (33.0, 0.0)


def test_the_figure_has_a_panel_per_study(study, tmp_path: Path, capsys):
    from PIL import Image

    from benchmarks import methods_figure
    from pixcli.figures import PANEL_SIZE

    for seed, value in enumerate([30.0, 34.0]):
        _metrics(tmp_path / f"seed{seed}" / "eval-none", value)
    _metrics(tmp_path / "seed0" / "eval-warmup", 20.0)
    _metrics(tmp_path / "seed0" / "eval-oracle", 60.0)
    _, _, raw = methods_quality.collect(study)
    (tmp_path / "quality.json").write_text(json.dumps(raw))
    out = tmp_path / "methods.png"
    methods_figure.main([str(tmp_path), str(tmp_path), "--out", str(out), "--titles", "a,b"])
    image = Image.open(out)
    assert image.size == (2 * PANEL_SIZE[0], PANEL_SIZE[1])
    with pytest.raises(SystemExit) as bad:
        methods_figure.main([str(tmp_path), str(tmp_path), "--out", str(out), "--titles", "a"])
    assert bad.value.code == 2
    assert capsys.readouterr().err == "--titles: 1 titles for 2 work directories\n"
    with pytest.raises(SystemExit) as bad:
        methods_figure.main([str(tmp_path / "nothing"), "--out", str(out)])
    assert bad.value.code == 2 and "quality.json: missing" in capsys.readouterr().err


def test_the_labels_table_takes_each_runs_last_logged_figures(study, tmp_path: Path):
    def log(run: Path, *entries: dict) -> None:
        run.mkdir(parents=True)
        (run / "train_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))

    for seed, last in enumerate([40.0, 44.0]):
        log(tmp_path / f"seed{seed}" / "adapt-none",
            {"step": 10, "pl_mIoU": 10.0, "pl_confident": 30.0},
            {"step": 20, "pl_mIoU": last, "pl_confident": 50.0},
            {"step": 20, "val_mIoU": 99.0})  # fmt: skip
    log(tmp_path / "seed0" / "adapt-flip", {"step": 20, "pl_mIoU": 30.0, "pl_teacher_mIoU": 35.0})
    rows = {r[0]: r for r in methods_quality.label_rows(study)}
    # none: the last pl_mIoU of each seed (40, 44) -> 42 ± 2.8; no teacher's series logged
    assert rows["none"] == ["none", "2", "42.0 ± 2.8", "-", "50.0 ± 0.0"]
    assert rows["flip"] == ["flip", "1", "30.0 ± 0.0", "35.0 ± 0.0", "-"]
    run = tmp_path / "seed0" / "distill-cpsl"
    assert methods_quality.run_dir(study, 0, "cpsl+distill") == run
    assert methods_quality.last_label_worth(run) == {}  # not run: no row
