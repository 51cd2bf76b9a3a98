"""Segmentation metrics from a confusion matrix, in detectron2's evaluator shape.

``SegEvaluator.reset() / process(pred, label) / evaluate()``. IoU of a class that appears
neither in the labels nor in the predictions is undefined (NaN) and left out of the means,
as in mmseg and cityscapesScripts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pixcli.data.taxonomy import IGNORE_INDEX


def confusion_matrix(
    pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """(C, C) int64 counts; rows are ground truth, columns predictions. Ignore pixels skipped."""
    keep = label != ignore_index
    lab = label[keep].long()
    if lab.numel() and int(lab.max()) >= num_classes:
        raise ValueError(f"label id {int(lab.max())} outside {num_classes} classes")
    idx = lab * num_classes + pred[keep].long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, -1)


def metrics_from_confusion(
    conf: np.ndarray,
    class_names: Sequence[str],
    subsets: dict[str, Sequence[int]] | None = None,
) -> dict:
    """Per-class IoU and accuracy, mIoU (and subset mIoUs), mean accuracy, overall accuracy.

    Values are percentages. ``subsets`` maps a name such as ``"mIoU16"`` to the train ids
    it averages over.
    """
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    gt = conf.sum(axis=1)
    pr = conf.sum(axis=0)
    union = gt + pr - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan) * 100
        acc = np.where(gt > 0, tp / gt, np.nan) * 100
    out: dict = {
        "mIoU": _nanmean(iou),
        "mAcc": _nanmean(acc),
        "aAcc": float(tp.sum() / conf.sum() * 100) if conf.sum() > 0 else float("nan"),
    }
    for name, ids in (subsets or {}).items():
        out[name] = _nanmean(iou[list(ids)])
    out["per_class"] = {
        name: {"IoU": _num(iou[i]), "Acc": _num(acc[i]), "pixels": int(gt[i])}
        for i, name in enumerate(class_names)
    }
    out["confusion"] = conf.astype(np.int64).tolist()
    return out


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def _num(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


class SegEvaluator:
    """Accumulates a confusion matrix over batches and turns it into metrics."""

    def __init__(
        self,
        class_names: Sequence[str],
        subsets: dict[str, Sequence[int]] | None = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        self.class_names = list(class_names)
        self.subsets = dict(subsets or {})
        self.ignore_index = ignore_index
        self.reset()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def reset(self) -> None:
        self.conf = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def process(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """Add predictions (class ids) and labels of the same shape."""
        if pred.shape != label.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)}")
        self.conf += confusion_matrix(pred.cpu(), label.cpu(), self.num_classes, self.ignore_index)

    def evaluate(self) -> dict:
        return metrics_from_confusion(self.conf.numpy(), self.class_names, self.subsets)


CONFIDENCE_EDGES: tuple[float, ...] = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class ConfidenceBins:
    """Pixel accuracy against confidence: how far a prediction (or pseudo label) can be
    trusted, and what a confidence threshold would keep.

    ``process(pred, confidence, label)`` counts labelled pixels and correct ones per
    confidence bin ``[edges[k], edges[k+1])`` (the last bin includes 1.0).
    """

    def __init__(
        self, edges: Sequence[float] = CONFIDENCE_EDGES, ignore_index: int = IGNORE_INDEX
    ) -> None:
        self.edges = torch.tensor(list(edges), dtype=torch.float64)
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        n = len(self.edges) - 1
        self.pixels = torch.zeros(n, dtype=torch.int64)
        self.correct = torch.zeros(n, dtype=torch.int64)

    def process(self, pred: torch.Tensor, confidence: torch.Tensor, label: torch.Tensor) -> None:
        keep = label != self.ignore_index
        conf = confidence[keep].double().cpu()
        hit = (pred[keep] == label[keep]).cpu()
        n = len(self.pixels)
        bins = (torch.bucketize(conf, self.edges[1:-1].contiguous(), right=True)).clamp(0, n - 1)
        self.pixels += torch.bincount(bins, minlength=n)
        self.correct += torch.bincount(bins[hit], minlength=n)

    def evaluate(self) -> list[dict]:
        """One row per bin: range, share of pixels and accuracy (%), and for "confidence >=
        the bin's lower edge" the share of pixels kept and their accuracy (%)."""
        total = max(int(self.pixels.sum()), 1)
        rows = []
        for k in range(len(self.pixels)):
            n, c = int(self.pixels[k]), int(self.correct[k])
            above_n, above_c = int(self.pixels[k:].sum()), int(self.correct[k:].sum())
            rows.append(
                {
                    "from": float(self.edges[k]),
                    "to": float(self.edges[k + 1]),
                    "pixels": n,
                    "share": 100.0 * n / total,
                    "accuracy": 100.0 * c / n if n else None,
                    "kept_share": 100.0 * above_n / total,
                    "kept_accuracy": 100.0 * above_c / above_n if above_n else None,
                }
            )
        return rows
