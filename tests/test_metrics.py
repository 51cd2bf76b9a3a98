import math

import numpy as np
import torch

from pixcli.engine.metrics import SegEvaluator, confusion_matrix, metrics_from_confusion


def test_confusion_counts_and_ignore():
    label = torch.tensor([[0, 0, 1], [2, 255, 1]])
    pred = torch.tensor([[0, 1, 1], [2, 0, 0]])
    conf = confusion_matrix(pred, label, 3)
    expected = [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert conf.tolist() == expected


def test_metrics_equal_hand_computation():
    # rows = ground truth, cols = prediction
    conf = np.array([[50, 10, 0], [5, 30, 5], [0, 0, 0]])
    m = metrics_from_confusion(conf, ["a", "b", "c"], subsets={"ab": (0, 1), "b": (1,)})
    iou_a = 50 / (60 + 55 - 50)
    iou_b = 30 / (40 + 40 - 30)
    # class c: never in labels, predicted 5 times -> IoU 0 (union 5), accuracy undefined
    assert math.isclose(m["per_class"]["a"]["IoU"], 100 * iou_a)
    assert math.isclose(m["per_class"]["b"]["IoU"], 100 * iou_b)
    assert m["per_class"]["c"]["IoU"] == 0.0
    assert m["per_class"]["c"]["Acc"] is None
    assert math.isclose(m["mIoU"], 100 * (iou_a + iou_b + 0) / 3)
    assert math.isclose(m["ab"], 100 * (iou_a + iou_b) / 2)
    assert math.isclose(m["mAcc"], 100 * (50 / 60 + 30 / 40) / 2)
    assert math.isclose(m["aAcc"], 100 * 80 / 100)
    assert m["per_class"]["a"]["pixels"] == 60


def test_class_absent_everywhere_is_left_out_of_the_mean():
    conf = np.array([[10, 0], [0, 0]])
    m = metrics_from_confusion(conf, ["a", "b"])
    assert m["per_class"]["b"]["IoU"] is None
    assert m["mIoU"] == 100.0


def test_evaluator_accumulates_batches():
    ev = SegEvaluator(["a", "b"])
    ev.process(torch.tensor([0, 1]), torch.tensor([0, 0]))
    ev.process(torch.tensor([1]), torch.tensor([1]))
    assert ev.conf.tolist() == [[1, 1], [0, 1]]
    assert math.isclose(ev.evaluate()["mIoU"], 50.0)
    ev.reset()
    assert ev.conf.sum() == 0
