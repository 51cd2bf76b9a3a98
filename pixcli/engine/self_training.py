"""The self-training step every adaptation method plugs into.

One step (UDA; DAFormer/DACS as the baseline every paper measures against):

1. labelled batch -> student (on ``method.student_input`` of the crop, the crop itself
   unless the method says otherwise) -> cross-entropy (source CE, CPSL Eq. 3);
2. unlabelled batch, weak view (crop + flip) -> EMA teacher -> probabilities -> hard pseudo
   labels and per-image confidence weights (``losses.self_training``);
3. the method's hook may change labels and weights (CPSL: rectification, Eq. 1);
4. ClassMix of labelled and unlabelled images (optional), then the strong photometric
   view (``data.mixing``) -> student -> weighted cross-entropy on the mixed labels;
5. the method's extra loss terms (and, with ``feature_distance > 0``, DAFormer's
   thing-class ImageNet feature distance on the labelled images, Eq. 8); one backward pass
   (under torchrun, the gradients of the method's own parameters are averaged over the
   ranks, as DDP does the student's); optimiser step;
6. EMA teacher update (momentum, optionally DAFormer's ramp), then the method's
   ``after_step``.

The labelled stream may be drawn by rare-class sampling (``rare_class_sampling``; built in
``stages.adapt`` with ``pixcli.data.rare_class``). With no unlabelled stream
(``--setting supervised``) steps 2-4 are skipped. The semi-supervised setting uses
UniMatch's step instead (``pixcli.engine.semi_step``), a subclass that replaces steps 2-4.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pixcli.data.mixing import classmix_masks, match_colour_statistics, mix, strong_view
from pixcli.data.taxonomy import IGNORE_INDEX
from pixcli.data.training_set import inside_image
from pixcli.engine.imagenet_fd import ImageNetFeatureDistance
from pixcli.engine.pseudo_quality import PseudoLabelMonitor
from pixcli.engine.runtime import Runtime, average_gradients, unwrap
from pixcli.errors import UserError
from pixcli.losses.feature_distance import CITYSCAPES_THING_CLASSES
from pixcli.losses.ohem import ohem_cross_entropy
from pixcli.losses.self_training import (
    confident_pseudo_labels,
    ema_momentum,
    ema_update,
    pseudo_labels_and_weights,
    weighted_cross_entropy,
)
from pixcli.methods.base import Method, StepContext, StrongView
from pixcli.models.norm_statistics import frozen_norm_statistics, target_norm_statistics

LABELLED_LOSSES = ("ce", "ohem")
PSEUDO_WEIGHTINGS = ("image", "pixel")
TEACHER_NORMS = ("running", "batch")
STUDENT_NORMS_FROM = ("all", "unlabelled")


@dataclass
class SelfTrainingConfig:
    """The shared loop's settings; defaults are DAFormer's (Hoyer et al., CVPR 2022)."""

    ema_momentum: float = 0.999  # DAFormer, CPSL Sec. 4.1
    ema_ramp: bool = True  # alpha_t = min(1 - 1/(t+1), ema_momentum) (DAFormer)
    confidence_threshold: float = 0.968  # DAFormer Eq. 5 / PGPC Eq. 3 / PiXL Eq. 11
    # The pseudo labels' weights: "image" (DAFormer Eq. 5: each image's confident share on
    # all its pixels) or "pixel" (FixMatch's mask: 1 on the confident pixels, 0 elsewhere;
    # a pixcli option for the UDA loop, as UniMatch's step does in the semi setting).
    pseudo_weighting: str = "image"
    # The teacher's pseudo labels from the mean of its probabilities on the weak view and on
    # its mirror image (flip test-time augmentation; a pixcli option, one more teacher forward).
    teacher_flip: bool = False
    classmix: bool = True  # DACS mixing of labelled into unlabelled images
    strong_jitter: float = 0.2  # DACS colour jitter strength
    strong_blur_prob: float = 0.5  # DACS blur probability
    unlabelled_weight: float = 1.0  # weight of the unlabelled (mixed) CE term
    # Share of the labelled images recoloured to the channel means and spreads of an
    # unlabelled image before the student sees them (and before ClassMix pastes them into the
    # target; data.mixing.match_colour_statistics). A pixcli option, not in the papers: 0 off.
    target_colour_stats: float = 0.0
    # The teacher's BatchNorm on the weak view: "running" (its EMA statistics, DAFormer's) or
    # "batch" (the unlabelled batch's own statistics, AdaBN per batch; a pixcli option).
    teacher_norm: str = "running"
    # Which student forwards move its BatchNorm running statistics (what the teacher's EMA and
    # evaluation use): "all" (DAFormer's) or "unlabelled" (only the mixed target images).
    student_norm_from: str = "all"
    consistency: str = "auto"  # dacs | unimatch (semi_step); auto: unimatch for --setting semi
    # The labelled loss: ce | ohem (UniMatch's on Cityscapes, pixcli.losses.ohem)
    labelled_loss: str = "ce"
    ohem_threshold: float = 0.7  # UniMatch configs/cityscapes.yaml: thresh 0.7
    ohem_min_kept_share: float = 0.156  # UniMatch: min_kept 200000 of 2 crops of 801x801
    # Rare-class sampling of the labelled stream (DAFormer Sec. 3.3, Eq. 6-7)
    rare_class_sampling: bool = False  # off by default (DAFormer turns it on)
    rcs_temperature: float = 0.01  # T of DAFormer Eq. 7
    rcs_min_pixels: int = 3  # DAFormer: 3000 at 1280x720; small for benchmark-size images
    # Thing-class ImageNet feature distance on the labelled images (DAFormer Eq. 8): its weight
    # lambda_FD (DAFormer: 0.005), 0 = off; needs model.pretrained or model.weights_file.
    feature_distance: float = 0.0
    fd_thing_classes: tuple[int, ...] = CITYSCAPES_THING_CLASSES  # DAFormer's thing classes
    fd_min_ratio: float = 0.75  # DAFormer: a cell is "thing" when one thing class covers this


def full_size(logits: Tensor, like: Tensor) -> Tensor:
    return F.interpolate(logits.float(), size=like.shape[-2:], mode="bilinear", align_corners=False)


def flip_averaged(logits: Tensor, model: nn.Module, image: Tensor) -> Tensor:
    """``teacher_flip``: log of the mean of softmax(``logits``) (the model's on ``image``,
    at its size) and the model's probabilities on the mirrored image, mirrored back. Its
    softmax is that mean, so what reads the teacher's logits reads the averaged view."""
    mirrored = full_size(model(image.flip(-1)).logits, image).softmax(1).flip(-1)
    return ((logits.float().softmax(1) + mirrored) / 2).clamp_min(1e-8).log()


def weak_view_pseudo_labels(probs: Tensor, cfg: SelfTrainingConfig) -> tuple[Tensor, Tensor]:
    """The teacher's probabilities (B, C, H, W) -> hard labels and their weights (B, H, W),
    by ``cfg.pseudo_weighting``: DAFormer's per-image confident share or the 0/1 mask."""
    if cfg.pseudo_weighting == "pixel":
        return confident_pseudo_labels(probs, cfg.confidence_threshold)
    return pseudo_labels_and_weights(probs, cfg.confidence_threshold)


class SelfTrainingStep:
    """Callable ``step(t) -> logs`` for :class:`pixcli.engine.trainer.TrainLoop`."""

    def __init__(
        self,
        cfg: SelfTrainingConfig,
        runtime: Runtime,
        student: nn.Module,
        teacher: nn.Module,
        method: Method,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        labelled: Iterator[dict],
        unlabelled: Iterator[dict] | None,
        seed: int = 0,
    ) -> None:
        if cfg.teacher_norm not in TEACHER_NORMS:
            raise UserError(
                f"self_training.teacher_norm {cfg.teacher_norm!r}: expected one of "
                f"{', '.join(TEACHER_NORMS)}"
            )
        if cfg.student_norm_from not in STUDENT_NORMS_FROM:
            raise UserError(
                f"self_training.student_norm_from {cfg.student_norm_from!r}: expected one of "
                f"{', '.join(STUDENT_NORMS_FROM)}"
            )
        if cfg.pseudo_weighting not in PSEUDO_WEIGHTINGS:
            raise UserError(
                f"self_training.pseudo_weighting {cfg.pseudo_weighting!r}: expected one of "
                f"{', '.join(PSEUDO_WEIGHTINGS)}"
            )
        if cfg.labelled_loss not in LABELLED_LOSSES:
            raise UserError(
                f"self_training.labelled_loss {cfg.labelled_loss!r}: expected one of "
                f"{', '.join(LABELLED_LOSSES)}"
            )
        self.cfg = cfg
        self.runtime = runtime
        self.student = student
        self.teacher = teacher
        self.method = method
        self.optimizer = optimizer
        self.scaler = scaler
        self.labelled = labelled
        self.unlabelled = unlabelled
        self.generator = torch.Generator().manual_seed(seed)
        self.labelled_weight = 1.0  # of the labelled CE term
        # the pseudo labels' worth against the unlabelled stream's own labels, when it has
        # them (set by the stage; pixcli.engine.pseudo_quality)
        self.monitor: PseudoLabelMonitor | None = None
        # the same for the loop's own labels (the teacher's argmax), fed only on steps where
        # the method's hook changed them (CPSL's rectification, distillation's labels)
        self.teacher_monitor: PseudoLabelMonitor | None = None
        self._upcoming: dict | None = None  # an unlabelled batch drawn ahead (_recoloured)
        self.fd: ImageNetFeatureDistance | None = None
        if cfg.feature_distance > 0:
            self.fd = ImageNetFeatureDistance(
                student, runtime.device, cfg.fd_thing_classes, cfg.fd_min_ratio,
                name="self_training.feature_distance",
            )  # fmt: skip

    def __call__(self, step: int) -> dict[str, float]:
        dev = self.runtime.device
        batch = next(self.labelled)
        ctx = StepContext(
            step=step,
            labelled_image=batch["image"].to(dev, non_blocking=True),
            labelled_label=batch["label"].to(dev, non_blocking=True),
            student=self.student,
        )
        if self.cfg.target_colour_stats > 0 and self.unlabelled is not None:
            ctx.labelled_image = self._recoloured(ctx.labelled_image, batch)
        losses: dict[str, Tensor] = {}
        with self.runtime.autocast():
            image = self.method.student_input(ctx.labelled_image)
            with self._labelled_norm():
                if self.fd is not None:
                    ctx.student_labelled, fd = self.fd(self.student, image, ctx.labelled_label)
                    losses["fd"] = self.cfg.feature_distance * fd
                else:
                    ctx.student_labelled = self.student(image)
            losses["ce_labelled"] = self.labelled_weight * self._labelled_loss(
                full_size(ctx.student_labelled.logits, ctx.labelled_image), ctx.labelled_label
            )
            if self.unlabelled is not None:
                losses["ce_unlabelled"] = self.cfg.unlabelled_weight * self._unlabelled(ctx)
            losses.update(self.method.losses(ctx))
        total = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        average_gradients(self.method.parameters(), self.runtime)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        momentum = self.method.teacher_momentum(
            ema_momentum(step, self.cfg.ema_momentum, self.cfg.ema_ramp)
        )
        ema_update(self.teacher, unwrap(self.student), momentum)
        self.method.after_step(ctx)
        logs = {k: float(v.detach()) for k, v in losses.items()}
        logs.update({k: float(v) for k, v in ctx.extras.items()})
        for monitor in (self.monitor, self.teacher_monitor):
            if monitor is not None:
                logs.update(monitor.summary())
        return logs

    def diagnostics(self) -> dict:
        """What the loop adds to a logged step's ``train_log.jsonl`` line besides the losses:
        the pseudo labels' IoU per class over the monitor's window."""
        out = {}
        for monitor in (self.monitor, self.teacher_monitor):
            if monitor is not None and monitor.steps:
                out[f"{monitor.prefix}_IoU"] = monitor.per_class()
        return out

    def observe_pseudo_labels(self, ctx: StepContext, batch: dict, valid: Tensor | None) -> None:
        """Feed the monitor this step's (hooked) pseudo labels against ``batch``'s labels."""
        if self.monitor is None or ctx.pseudo_label is None or ctx.teacher_logits is None:
            return
        with torch.no_grad():
            label = batch["label"].to(ctx.pseudo_label.device)
            if valid is not None:
                label = label.masked_fill(~valid, IGNORE_INDEX)
            confidence = ctx.teacher_logits.float().softmax(1).amax(1)
            self.monitor.update(ctx.pseudo_label, confidence, label)
            loop_label, teacher = ctx.loop_label, self.teacher_monitor
            changed = loop_label is not None and loop_label is not ctx.pseudo_label
            if teacher is not None and changed:  # the method's hook changed the labels
                assert loop_label is not None
                teacher.update(loop_label, confidence, label)

    def _next_unlabelled(self) -> dict:
        """The next unlabelled batch (the one :meth:`_recoloured` took the colours of, when
        it took one)."""
        assert self.unlabelled is not None
        batch, self._upcoming = self._upcoming, None
        return batch if batch is not None else next(self.unlabelled)

    def _recoloured(self, image: Tensor, batch: dict) -> Tensor:
        """``target_colour_stats``: that share of the labelled images, each drawn at random,
        recoloured to the unlabelled image of its index in this step's unlabelled batch."""
        assert self.unlabelled is not None
        self._upcoming = next(self.unlabelled)
        target = self._upcoming["image"].to(image.device, non_blocking=True)
        n = min(image.shape[0], target.shape[0])
        chosen = torch.rand(n, generator=self.generator) < self.cfg.target_colour_stats
        if not chosen.any():
            return image
        idx = chosen.nonzero()[:, 0].to(image.device)
        image = image.clone()
        image[idx] = match_colour_statistics(
            image[idx],
            target[idx],
            inside_image(batch["geometry"][:n][chosen]).to(image.device),
            inside_image(self._upcoming["geometry"][:n][chosen]).to(image.device),
        )
        return image

    def _labelled_norm(self) -> AbstractContextManager:
        """Around the labelled forward: with ``student_norm_from = "unlabelled"`` (and an
        unlabelled stream to take the statistics from) it leaves BatchNorm's running
        statistics alone."""
        if self.cfg.student_norm_from == "unlabelled" and self.unlabelled is not None:
            return frozen_norm_statistics(self.student)
        return nullcontext()

    def _teacher_norm(self) -> AbstractContextManager:
        if self.cfg.teacher_norm == "batch":
            return target_norm_statistics(self.teacher)
        return nullcontext()

    def _labelled_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        if self.cfg.labelled_loss == "ohem":
            return ohem_cross_entropy(
                logits, labels, self.cfg.ohem_threshold, self.cfg.ohem_min_kept_share
            )
        return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)

    def _unlabelled(self, ctx: StepContext) -> Tensor:
        batch = self._next_unlabelled()
        dev = self.runtime.device
        ctx.unlabelled_image = batch["image"].to(dev, non_blocking=True)
        ctx.unlabelled_index = batch["index"]
        ctx.unlabelled_geometry = batch["geometry"]
        with torch.no_grad(), self._teacher_norm():
            ctx.teacher_output = self.teacher(ctx.unlabelled_image)
            ctx.teacher_logits = full_size(ctx.teacher_output.logits, ctx.unlabelled_image)
            if self.cfg.teacher_flip:
                ctx.teacher_logits = flip_averaged(
                    ctx.teacher_logits, self.teacher, ctx.unlabelled_image
                )
            labels, weights = weak_view_pseudo_labels(ctx.teacher_logits.softmax(1), self.cfg)
        ctx.pseudo_label, ctx.pseudo_weight = labels, weights
        ctx.loop_label = labels
        labels, weights = self.method.target_labels(ctx)
        ctx.pseudo_label, ctx.pseudo_weight = labels, weights
        self.observe_pseudo_labels(ctx, batch, inside_image(ctx.unlabelled_geometry).to(dev))
        image = ctx.unlabelled_image
        if self.cfg.classmix:
            n = min(image.shape[0], ctx.labelled_image.shape[0])
            ctx.mix_mask = classmix_masks(ctx.labelled_label[:n], self.generator)
            image = mix(ctx.mix_mask, ctx.labelled_image[:n], image[:n])
            labels = mix(ctx.mix_mask, ctx.labelled_label[:n], labels[:n])
            weights = mix(ctx.mix_mask, torch.ones_like(weights[:n]), weights[:n])
        if self.method.use_strong_view():
            image = strong_view(
                image, self.cfg.strong_jitter, self.cfg.strong_blur_prob, self.generator
            )
        ctx.mixed_image, ctx.mixed_label, ctx.mixed_weight = image, labels, weights
        ctx.student_unlabelled = self.student(self.method.student_input(ctx.mixed_image))
        n = image.shape[0]
        valid = inside_image(ctx.unlabelled_geometry[:n]).to(image.device)
        if ctx.mix_mask is not None:
            valid &= ctx.mix_mask[:, 0] < 0.5
        view = StrongView(image, ctx.teacher_logits[:n], valid, ctx.student_unlabelled)
        ctx.strong_views = [view]
        logits = full_size(ctx.student_unlabelled.logits, ctx.mixed_image)
        return weighted_cross_entropy(logits, labels, weights)
