"""Evaluate a model on a labelled dataset: predictions, confusion matrix, metrics.

Under torchrun each rank takes every ``world_size``-th image and the confusion matrices
are summed, so the metrics equal a one-process run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pixcli.data.readers import SegDataset
from pixcli.data.transforms import normalize
from pixcli.engine.inference import InferenceConfig, predict_logits
from pixcli.engine.metrics import ConfidenceBins, SegEvaluator
from pixcli.engine.progress import make_progress
from pixcli.engine.runtime import Runtime

if TYPE_CHECKING:
    from pixcli.pseudo_labels import PseudoLabelFile

PredictionHook = Callable[[str, np.ndarray], None]


def evaluate_dataset(
    model: nn.Module,
    dataset: SegDataset,
    infer: InferenceConfig,
    runtime: Runtime,
    on_prediction: PredictionHook | None = None,
    show_progress: bool = True,
    previews: int = 0,
) -> dict:
    """Metrics of ``model`` on ``dataset`` (which must have labels); see ``engine.metrics``.

    ``on_prediction(name, pred)`` is called with each predicted train-id map (uint8).
    ``previews > 0`` adds ``"previews"``: a list of ``(image, label, pred)`` uint8 arrays of
    the first ``previews`` images (rank 0's share), for a training run's TensorBoard
    (:meth:`pixcli.engine.tracking.RunLog.write_previews`); not JSON, so not for
    ``metrics.json``.
    """
    was_training = model.training
    model.eval()
    evaluator = SegEvaluator(dataset.taxonomy.classes, dataset.taxonomy.subsets())
    indices = range(runtime.rank, len(dataset), runtime.world_size)
    kept: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    keep = previews if runtime.is_main else 0
    with make_progress(show_progress and runtime.is_main) as progress:
        task = progress.add_task("eval", total=len(indices), rate="", info="")
        for i in indices:
            image, label, name = dataset[i]
            x = normalize(image).unsqueeze(0).to(runtime.device)
            with runtime.autocast():
                pred = predict_logits(model, x, infer).argmax(1)[0].cpu()
            if label is not None:
                evaluator.process(pred, torch.from_numpy(label))
            if on_prediction is not None:
                on_prediction(name, pred.numpy().astype(np.uint8))
            if len(kept) < keep and label is not None:
                kept.append((image, label, pred.numpy().astype(np.uint8)))
            progress.advance(task)
    if runtime.distributed:
        conf = evaluator.conf.to(runtime.device)
        dist.all_reduce(conf)
        evaluator.conf = conf.cpu()
    model.train(was_training)
    metrics = evaluator.evaluate()
    if previews > 0:
        metrics["previews"] = kept
    return metrics


def evaluate_pseudo_labels(
    labels: PseudoLabelFile, dataset: SegDataset, runtime: Runtime, show_progress: bool = True
) -> dict:
    """Quality of stored pseudo labels against ``dataset``'s labels (which it must have).

    Each image's soft labels are resized to the image (as training sees them); their argmax
    gives the metrics of ``engine.metrics`` and their maximum the accuracy per confidence bin
    (``"confidence"``: :meth:`ConfidenceBins.evaluate`). Sharded over ranks like
    :func:`evaluate_dataset`.
    """
    evaluator = SegEvaluator(dataset.taxonomy.classes, dataset.taxonomy.subsets())
    bins = ConfidenceBins()
    indices = range(runtime.rank, len(dataset), runtime.world_size)
    with make_progress(show_progress and runtime.is_main) as progress:
        task = progress.add_task("pseudo-label quality", total=len(indices), rate="", info="")
        for i in indices:
            label = dataset.read_label(i)
            if label is None:
                raise ValueError(f"{dataset.items[i][0]}: no label")
            j = labels.index(dataset.items[i][2])
            confidence, pred = labels.soft_resized(j, label.shape, runtime.device).max(dim=0)
            target = torch.from_numpy(label).to(runtime.device)
            evaluator.process(pred, target)
            bins.process(pred, confidence, target)
            progress.advance(task)
    if runtime.distributed:
        for acc, name in ((evaluator, "conf"), (bins, "pixels"), (bins, "correct")):
            value = getattr(acc, name).to(runtime.device)
            dist.all_reduce(value)
            setattr(acc, name, value.cpu())
    return {**evaluator.evaluate(), "confidence": bins.evaluate()}
