"""``pixcli embed-report``: sampling, indices, t-SNE, pictures; the stage and the command."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_cityscapes
from PIL import Image
from tiny import random_checkpoint
from typer.testing import CliRunner

from pixcli.artifacts import read_json
from pixcli.cli import app
from pixcli.data.taxonomy import CITYSCAPES
from pixcli.engine.embedding import (
    ClassBudgetSampler,
    TsneConfig,
    cluster_scores,
    labels_on_grid,
    tsne_2d,
)
from pixcli.engine.runtime import Runtime
from pixcli.errors import UserError
from pixcli.models import SegmentorConfig
from pixcli.plots import BLACK, WHITE, legend_image, scatter_panel, side_by_side
from stages import embed_report

PALETTE = CITYSCAPES.palette
FAST_TSNE = TsneConfig(perplexity=10, max_iter=250)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One OpenMP thread: t-SNE of a few points with two threads on a busy machine is all
    waiting at barriers (torch and scikit-learn share libgomp, and torch's forward resets
    its thread count, so torch's own setting is what counts)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _colours(path: Path) -> set[tuple[int, int, int]]:
    return {c for _, c in Image.open(path).convert("RGB").getcolors(1 << 20)}


def _clusters(separated: bool, n: int = 60, k: int = 4, d: int = 16, seed: int = 0):
    """``k`` classes of ``n`` points: around far-apart centres, or all around one centre."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(k), n)
    centres = rng.normal(size=(k, d)) * (10.0 if separated else 0.0)
    return (centres[labels] + rng.normal(size=(k * n, d))).astype(np.float32), labels


# ------------------------------------------------------------------------------ maths


def test_labels_on_grid_take_the_label_at_each_cell_centre():
    label = np.arange(8 * 12).reshape(8, 12)
    np.testing.assert_array_equal(labels_on_grid(label, (2, 3)), label[np.ix_([2, 6], [2, 6, 10])])
    np.testing.assert_array_equal(labels_on_grid(label, (8, 12)), label)


def _stream(seed: int, per_class: int = 20) -> tuple[ClassBudgetSampler, list[np.ndarray]]:
    """Five images of 200 pixels: class 0 frequent, 1 rare (7 in all), 2 absent, 255 ignored."""
    rng = np.random.default_rng(99)
    sampler, images = ClassBudgetSampler(4, per_class, seed), []
    for i in range(5):
        labels = rng.choice([0, 0, 0, 3, 255], size=200)
        labels[:2] = 1 if i < 3 else 0  # 6 pixels of class 1 ...
        labels[2] = 1 if i == 4 else 3  # ... and a seventh
        features = np.stack([labels, np.full(200, i), np.arange(200)], axis=1).astype(np.float32)
        sampler.add(i, features, labels)
        images.append(labels)
    return sampler, images


def test_per_class_budget_is_respected_and_ignore_left_out():
    sampler, _ = _stream(seed=0)
    np.testing.assert_array_equal(sampler.counts(), [20, 7, 0, 20])
    features, labels = sampler.result()
    assert features.shape == (47, 3) and sorted(set(labels.tolist())) == [0, 1, 3]
    np.testing.assert_array_equal(features[:, 0], labels)  # each feature kept with its label
    assert len({(f[1], f[2]) for f in features.tolist()}) == 47  # no pixel twice


def test_streamed_sample_equals_the_smallest_keys_over_all_images():
    sampler, images = _stream(seed=5)
    keys = [np.random.default_rng([5, i]).random(200) for i in range(5)]
    features, labels = sampler.result()
    for c in (0, 3):
        pixels = [
            (key[j], i, j) for i, key in enumerate(keys) for j in np.flatnonzero(images[i] == c)
        ]
        expected = {(i, j) for _, i, j in sorted(pixels)[:20]}
        assert {(int(f[1]), int(f[2])) for f in features[labels == c]} == expected


def test_same_seed_same_sample_other_seed_other_sample():
    a, b, c = (_stream(seed)[0].result()[0] for seed in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_separated_clusters_score_better_than_mixed_ones():
    good = cluster_scores(*_clusters(separated=True), silhouette_points=100)
    bad = cluster_scores(*_clusters(separated=False), silhouette_points=100)
    assert good["calinski_harabasz"] > 10 * bad["calinski_harabasz"]
    assert good["davies_bouldin"] < bad["davies_bouldin"] / 5
    assert good["silhouette"] > 0.5 > bad["silhouette"]


def test_indices_are_undefined_for_one_class():
    features, _ = _clusters(separated=True)
    scores = cluster_scores(features, np.zeros(len(features), dtype=np.int64))
    assert scores == {"calinski_harabasz": None, "davies_bouldin": None, "silhouette": None}


def test_tsne_is_deterministic_and_keeps_clusters_apart():
    features, labels = _clusters(separated=True, n=30, d=60)  # wider than pca_dims: PCA first
    cfg = dataclasses.replace(FAST_TSNE, pca_dims=20)
    points = tsne_2d(features, cfg, seed=3)
    assert points.shape == (120, 2)
    np.testing.assert_array_equal(points, tsne_2d(features, cfg, seed=3))
    assert cluster_scores(points, labels)["silhouette"] > 0.5


# ------------------------------------------------------------------------------ pictures


def test_scatter_shows_one_colour_per_class_present(tmp_path: Path):
    points, labels = _clusters(separated=True, n=20, d=2)
    labels = np.array([0, 5, 13, 18])[labels]
    entries = [(CITYSCAPES.classes[c], PALETTE[c]) for c in (0, 5, 13, 18)]
    panel = scatter_panel(points, labels, PALETTE, ["a title", "a second line"])
    image = side_by_side([panel, panel, legend_image(entries)])
    image.save(tmp_path / "p.png")
    assert _colours(tmp_path / "p.png") == {WHITE, BLACK, *(PALETTE[c] for c in (0, 5, 13, 18))}
    assert image.width > 2 * panel.width


# ------------------------------------------------------------------------------ stage


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("ckpt")
    plain = SegmentorConfig(backbone="test_resnet", head="deeplabv3plus", feature_dim=8)
    with_proj = dataclasses.replace(plain, head="daformer", proj_dim=4)  # both at stride 4
    return [
        random_checkpoint(root / "plain" / "model.pt", plain),
        random_checkpoint(root / "proj" / "model.pt", with_proj, seed=1),
    ]


def _config(data: str, **changes: object) -> embed_report.EmbedReportConfig:
    cfg = embed_report.EmbedReportConfig(data=data, per_class=6, device="cpu", tsne=FAST_TSNE)
    return dataclasses.replace(cfg, **changes)  # type: ignore[arg-type]


def test_stage_writes_report_pictures_and_is_deterministic(
    tiny_bench: Path, checkpoints: list[Path], tmp_path: Path
):
    cfg = _config(f"cityscapes:{tiny_bench / 'target'}")
    report = embed_report.run(cfg, checkpoints, tmp_path / "a")
    out = tmp_path / "a"
    plain, proj = report["checkpoints"]
    assert (plain["name"], proj["name"]) == ("plain/model.pt", "proj/model.pt")
    assert (plain["feature"], plain["dim"], proj["feature"], proj["dim"]) == (
        "features", 8, "proj", 4,
    )  # fmt: skip
    assert report["labels"] == "ground truth" and report["side_by_side"]
    for entry in (plain, proj):
        counts = entry["points_per_class"]
        assert max(counts.values()) == 6 and sum(counts.values()) == entry["points"]
        assert entry["classes"] == len(counts) >= 4
        present = {PALETTE[CITYSCAPES.classes.index(c)] for c in counts}
        assert _colours(out / entry["png"]) == {WHITE, BLACK, *present}
    for name in ("report.json", "report.md", "manifest.json", report["side_by_side"]):
        assert (out / name).is_file()
    md = (out / "report.md").read_text()
    assert "Calinski-Harabasz" in md and f"]({plain['png']})" in md
    again = embed_report.run(cfg, checkpoints, tmp_path / "b")
    assert again["checkpoints"] == report["checkpoints"]
    assert embed_report.run(cfg, checkpoints, out) == read_json(out / "report.json")


def test_unlabelled_data_is_labelled_by_the_predictions(checkpoints: list[Path], tmp_path: Path):
    data = make_cityscapes(tmp_path / "cs", split="val", size=(32, 48), labels=False)
    cfg = _config(f"cityscapes:{data}", per_class=3)
    report = embed_report.run(cfg, checkpoints[:1], tmp_path / "out")
    assert report["labels"] == "predictions" and report["side_by_side"] is None
    assert max(report["checkpoints"][0]["points_per_class"].values()) <= 3
    assert not (tmp_path / "out" / embed_report.SIDE_BY_SIDE).exists()


def test_other_ranks_leave_at_once_and_write_nothing(
    tiny_bench: Path, checkpoints: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Rank 1 of 2 neither embeds nor writes: the main rank computes the report alone."""
    rank1 = Runtime(device=torch.device("cpu"), rank=1, world_size=2)
    monkeypatch.setattr(embed_report, "setup_runtime", lambda *args: rank1)
    monkeypatch.setenv("RANK", "1")  # as torchrun sets it: shared files are rank 0's to write

    def no_embedding(*args: object) -> None:
        raise AssertionError("rank 1 computed an embedding")

    monkeypatch.setattr(embed_report, "_embed", no_embedding)
    out = tmp_path / "out"
    assert embed_report.run(_config(f"cityscapes:{tiny_bench / 'target'}"), checkpoints, out) == {}
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"feature": "proj"}, "no projection head"),
        ({"feature": "logits"}, "expected one of auto"),
        ({"per_class": 0}, "at least 1"),
    ],
)
def test_bad_settings_are_user_errors(
    tiny_bench: Path, checkpoints: list[Path], tmp_path: Path, changes: dict, message: str
):
    cfg = _config(f"cityscapes:{tiny_bench / 'target'}", **changes)
    with pytest.raises(UserError, match=message):
        embed_report.run(cfg, checkpoints[:1], tmp_path / "out")


def test_names_tell_same_named_checkpoints_apart():
    names = embed_report.checkpoint_names([Path("/r/a/model.pt"), Path("/r/b/model.pt")])
    assert names == ["a/model.pt", "b/model.pt"]
    assert embed_report.png_names(["a-b/model.pt", "a_b/model.pt"]) == [
        "tsne_1_a_b_model.png", "tsne_2_a_b_model.png",
    ]  # fmt: skip


# ------------------------------------------------------------------------------ command


def test_command_line(tiny_bench: Path, checkpoints: list[Path], tmp_path: Path):
    runner = CliRunner()
    data = f"cityscapes:{tiny_bench / 'target'}"
    args = ["embed-report", "--data", data, "--device", "cpu", "--per-class", "4"]
    tsne = ["--set", "tsne.max_iter=250", "--set", "tsne.perplexity=5"]
    result = runner.invoke(app, [*args, "--checkpoint", str(checkpoints[0]), *tsne, "--out",
                                 str(tmp_path / "r")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "plain/model.pt" in result.output and (tmp_path / "r" / "report.md").is_file()
    twice = [*args, "--checkpoint", str(checkpoints[0]), "--checkpoint", str(checkpoints[0])]
    result = runner.invoke(app, [*twice, "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "more than once" in result.output
    assert len(result.output.strip().splitlines()) == 1
