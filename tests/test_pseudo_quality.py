"""The pseudo labels' worth during a run (pixcli.engine.pseudo_quality, issue 17)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_adapt import _cfg

from pixcli.engine.pseudo_quality import PseudoLabelMonitor
from stages import adapt


def test_monitor_by_hand():
    m = PseudoLabelMonitor(["a", "b", "c"], threshold=0.9, window=2)
    pseudo = torch.tensor([[[0, 0, 1, 1]]])
    truth = torch.tensor([[[0, 1, 1, 255]]])  # the last pixel has no true label
    conf = torch.tensor([[[0.95, 0.5, 0.99, 0.99]]])
    m.update(pseudo, conf, truth)
    # a: tp 1, fp 1 (pixel 1), fn 0 -> IoU 1/2; b: tp 1, fn 1 -> 1/2; c absent
    assert m.per_class() == {"a": 50.0, "b": 50.0, "c": None}
    s = m.summary()
    assert s["pl_mIoU"] == pytest.approx(50.0)
    assert s["pl_confident"] == pytest.approx(100 * 2 / 3)  # pixels 0 and 2 of 3 known
    assert s["pl_confident_acc"] == pytest.approx(100.0)


def test_pixels_without_a_pseudo_label_are_left_out_and_counted():
    m = PseudoLabelMonitor(["a", "b"], threshold=0.9, window=1)
    pseudo = torch.tensor([[[0, 255, 1, 255]]])  # the method ignores pixels 1 and 3
    truth = torch.tensor([[[0, 0, 1, 1]]])
    m.update(pseudo, torch.ones(1, 1, 4), truth)
    assert m.per_class() == {"a": 100.0, "b": 100.0}  # not "a" predicted on pixel 3
    assert m.summary()["pl_ignored"] == pytest.approx(50.0)
    m.update(truth, torch.ones(1, 1, 4), truth)
    assert "pl_ignored" not in m.summary()
    m.update(torch.full((1, 1, 4), 255), torch.ones(1, 1, 4), truth)  # nothing labelled
    summary = m.summary()
    assert "pl_mIoU" not in summary and summary["pl_ignored"] == 100.0  # no NaN mIoU


def test_monitor_window_and_unlabelled_batches():
    m = PseudoLabelMonitor(["a", "b"], threshold=0.5, window=2)
    zeros, ones, sure = torch.zeros(1, 1, 2).long(), torch.ones(1, 1, 2).long(), torch.ones(1, 1, 2)
    m.update(zeros, sure, torch.full((1, 1, 2), 255))
    assert m.summary() == {} and m.per_class() == {}  # no true label seen: nothing to say
    m.update(ones, sure, zeros)  # all wrong
    assert m.summary()["pl_confident_acc"] == 0.0
    for _ in range(2):  # all right, twice: the wrong step leaves the 2-step window
        m.update(zeros, sure, zeros)
    assert m.summary()["pl_confident_acc"] == 100.0 and m.per_class() == {"a": 100.0, "b": None}


def test_adapt_logs_the_pseudo_labels_worth_when_the_target_has_labels(
    tiny_bench: Path, warm: Path, tmp_path: Path
):
    adapt.run(_cfg(tiny_bench), warm, tmp_path / "a")
    lines = (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()
    steps = [e for e in map(json.loads, lines) if "ce_unlabelled" in e]
    assert steps and all(0 <= e["pl_mIoU"] <= 100 and 0 <= e["pl_confident"] <= 100 for e in steps)
    assert all(set(e["pl_IoU"]) >= {"road", "car"} for e in steps)
    # `none` keeps the teacher's labels: no second, identical pl_teacher_ series
    assert not any(k.startswith("pl_teacher") for e in steps for k in e)


def test_a_prefixed_monitor_names_every_key_with_it():
    m = PseudoLabelMonitor(["a", "b"], threshold=0.5, window=1, prefix="pl_teacher")
    m.update(torch.tensor([[[0, 255]]]), torch.ones(1, 1, 2), torch.tensor([[[0, 1]]]))
    assert m.summary() == {
        "pl_teacher_confident": 100.0, "pl_teacher_mIoU": 100.0,
        "pl_teacher_confident_acc": 50.0, "pl_teacher_ignored": 50.0,
    }  # fmt: skip
