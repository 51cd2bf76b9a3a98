"""UniMatch's weak-to-strong step (Yang et al., CVPR 2023): the loop's step for
``--setting semi`` (``self_training.consistency = "unimatch"``).

A subclass of :class:`~pixcli.engine.self_training.SelfTrainingStep` that replaces the
unlabelled part (steps 2-4 there); the labelled CE, the method's loss terms, the optimiser
step, the EMA teacher update and ``after_step`` are the shared loop's. One step, as
UniMatch's ``unimatch.py``:

1. labelled batch -> student -> cross-entropy, weight 0.5 (UniMatch's total is
   ``(L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2``);
2. two unlabelled batches from the one stream: the images and their CutMix partners
   (UniMatch draws its "mix" batch from the same loader); weak views (crop + flip) -> teacher
   -> hard pseudo labels, a per-pixel confidence mask (max probability >= 0.95) and the
   padding mask; the method's label hook on each batch;
3. one or two strong views (``dual_strong``): every image and every partner gets its own
   photometric strong view (colour jitter p=0.8, grayscale p=0.2, blur p=0.5); a CutMix box
   per image (p=0.5) pastes the partner's strong view, and the same box its labels,
   confidences, padding and teacher logits;
4. student on the strong views -> CE of the confident pixels over the non-padding pixels;
   the views' mean weighs 0.25;
5. feature perturbation (``feature_perturbation``): the student on the weak view with
   ``Dropout2d(0.5)`` on the backbone features -> the same masked CE on the weak view's
   labels, weight 0.25.

``ctx.strong_views`` holds each strong view with its cut-mixed teacher logits for the
method's losses; ``ctx.mixed_image``/``mixed_label``/``mixed_weight``/``mix_mask``/
``student_unlabelled`` are the first view. The student sees the method's ``student_input``
of each strong view (PiXL's X^L); the FP stream sees the weak view itself.

Choices:

- Teacher: IPixMatch (Sec. III-B) updates the teacher as an EMA of the student; that is the
  default (the loop's momentum and ramp). ``ema_teacher = false`` gives UniMatch's own,
  the student as its teacher: the teacher is then a copy of the current student (EMA
  momentum 0) run in eval mode. (UniMatch predicts the partner batch in eval mode too, but
  the image batch in train mode, with batch statistics.)
- Forwards: UniMatch runs labelled and weak images through one forward (shared BatchNorm
  statistics, the FP stream from the same backbone pass); here the labelled forward is the
  loop's and the FP forward sees the weak images alone, with only its perturbed output.
- The FP forward leaves BatchNorm's running statistics alone
  (:func:`~pixcli.models.norm_statistics.frozen_norm_statistics`). UniMatch's decoder
  normalises a batch of clean and perturbed features together, half and half; a forward of
  perturbed features alone, run last in the step, would pull the running statistics towards
  dropout-scaled features that evaluation never sees (on the built-in benchmark, 1/8
  labelled: 68.4 mIoU with the FP stream updating them, 73.4 without; 74.6 with no FP
  stream at all).
- UniMatch's labelled loss on Cityscapes is OHEM (``ProbOhemCrossEntropy2d``); here it is the
  loop's, plain cross-entropy unless ``self_training.labelled_loss = "ohem"``
  (:mod:`pixcli.losses.ohem`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from pixcli.data.mixing import PhotometricConfig, cutmix_boxes, mix, photometric_view
from pixcli.data.training_set import inside_image
from pixcli.engine.self_training import SelfTrainingConfig, SelfTrainingStep, full_size
from pixcli.losses.self_training import confident_pseudo_labels, weighted_cross_entropy
from pixcli.methods.base import StepContext, StrongView
from pixcli.models.norm_statistics import frozen_norm_statistics
from pixcli.models.segmentor import SegOutput


@dataclass
class UniMatchConfig:
    """The semi-supervised step's settings; defaults are UniMatch's (its ``unimatch.py``,
    ``dataset/semi.py``); the ``[unimatch]`` section of ``pixcli adapt``."""

    confidence_threshold: float = 0.95  # conf_thresh, UniMatch Sec. 4.1
    dual_strong: bool = True  # two strong views (UniMatch's dual-stream perturbation)
    feature_perturbation: bool = True  # the FP stream (UniMatch's unified perturbation)
    feature_dropout: float = 0.5  # nn.Dropout2d(0.5) on the encoder features (UniMatch)
    labelled_weight: float = 0.5  # L_x / 2 (UniMatch)
    strong_weight: float = 0.25  # (0.25 L_s1 + 0.25 L_s2) / 2 = 0.25 * mean (UniMatch)
    fp_weight: float = 0.25  # 0.5 L_fp / 2 (UniMatch)
    cutmix_prob: float = 0.5  # obtain_cutmix_box(p=0.5) (UniMatch)
    ema_teacher: bool = True  # EMA teacher (IPixMatch Sec. III-B); false: the student itself
    strong: PhotometricConfig = field(default_factory=PhotometricConfig)  # [unimatch.strong]


def rows(out: SegOutput, index: slice) -> SegOutput:
    """The images ``index`` of a batched :class:`SegOutput`."""
    proj = out.proj[index] if out.proj is not None else None
    return SegOutput(logits=out.logits[index], features=out.features[index], proj=proj)


class UniMatchStep(SelfTrainingStep):
    """Callable ``step(t) -> logs``; the arguments after ``semi`` are
    :class:`SelfTrainingStep`'s."""

    def __init__(
        self, semi: UniMatchConfig, cfg: SelfTrainingConfig, *args: Any, **kwargs: Any
    ) -> None:
        if not semi.ema_teacher:
            cfg = dataclasses.replace(cfg, ema_momentum=0.0, ema_ramp=False)
        super().__init__(cfg, *args, **kwargs)
        self.semi = semi
        self.labelled_weight = semi.labelled_weight

    def _unlabelled(self, ctx: StepContext) -> Tensor:
        assert self.unlabelled is not None
        dev = self.runtime.device
        batch, partner_batch = self._next_unlabelled(), next(self.unlabelled)
        weak = batch["image"].to(dev, non_blocking=True)
        partner_weak = partner_batch["image"].to(dev, non_blocking=True)
        n = weak.shape[0]
        with torch.no_grad(), self._teacher_norm():
            both = self.teacher(torch.cat([weak, partner_weak]))
        ctx.unlabelled_image = weak
        ctx.unlabelled_index = batch["index"]
        ctx.unlabelled_geometry = batch["geometry"]
        ctx.teacher_output = rows(both, slice(0, n))
        partner = StepContext(
            step=ctx.step,
            labelled_image=ctx.labelled_image,
            labelled_label=ctx.labelled_label,
            unlabelled_image=partner_weak,
            unlabelled_index=partner_batch["index"],
            unlabelled_geometry=partner_batch["geometry"],
            teacher_output=rows(both, slice(n, None)),
        )
        valid, partner_valid = self._pseudo_labels(ctx), self._pseudo_labels(partner)
        self.observe_pseudo_labels(ctx, batch, valid)
        strong_ce = []
        views = [self._cutmix(ctx, partner) for _ in range(2 if self.semi.dual_strong else 1)]
        student = self.student(self.method.student_input(torch.cat([im for _, im in views])))
        mixed: list[tuple[Tensor, Tensor]] = []
        for k, (box, image) in enumerate(views):
            out = rows(student, slice(k * n, (k + 1) * n))
            labels = mix(box, partner.pseudo_label, ctx.pseudo_label)
            weights = mix(box, partner.pseudo_weight, ctx.pseudo_weight)
            teacher_logits = mix(box, partner.teacher_logits, ctx.teacher_logits)
            view_valid = mix(box, partner_valid, valid)
            ctx.strong_views.append(StrongView(image, teacher_logits, view_valid, out))
            mixed.append((labels, weights))
            strong_ce.append(weighted_cross_entropy(full_size(out.logits, image), labels, weights))
        ctx.mix_mask, ctx.mixed_image = views[0]
        ctx.mixed_label, ctx.mixed_weight = mixed[0]
        ctx.student_unlabelled = ctx.strong_views[0].student
        ce_strong = torch.stack(strong_ce).mean()
        loss = self.semi.strong_weight * ce_strong
        ctx.extras["ce_strong"] = ce_strong.detach()
        if self.semi.feature_perturbation:
            with frozen_norm_statistics(self.student):
                fp = self.student(weak, feature_dropout=self.semi.feature_dropout)
            ce_fp = weighted_cross_entropy(
                full_size(fp.logits, weak), ctx.pseudo_label, ctx.pseudo_weight
            )
            loss = loss + self.semi.fp_weight * ce_fp
            ctx.extras["ce_fp"] = ce_fp.detach()
        confident = (ctx.pseudo_weight > 0) & valid
        ctx.extras["confident"] = confident.sum() / valid.sum().clamp_min(1)
        return loss

    def _pseudo_labels(self, ctx: StepContext) -> Tensor:
        """Fill ``ctx``'s teacher logits and (hooked) pseudo labels; return its padding mask."""
        assert ctx.teacher_output is not None and ctx.unlabelled_image is not None
        assert ctx.unlabelled_geometry is not None
        with torch.no_grad():
            ctx.teacher_logits = full_size(ctx.teacher_output.logits, ctx.unlabelled_image)
            valid = inside_image(ctx.unlabelled_geometry).to(ctx.teacher_logits.device)
            ctx.pseudo_label, ctx.pseudo_weight = confident_pseudo_labels(
                ctx.teacher_logits.softmax(1), self.semi.confidence_threshold, valid
            )
        ctx.loop_label = ctx.pseudo_label
        ctx.pseudo_label, ctx.pseudo_weight = self.method.target_labels(ctx)
        return valid

    def _cutmix(self, ctx: StepContext, partner: StepContext) -> tuple[Tensor, Tensor]:
        """A CutMix box per image and the image's strong view with the partner's pasted in."""
        assert ctx.unlabelled_image is not None and partner.unlabelled_image is not None
        own, other = ctx.unlabelled_image, partner.unlabelled_image
        if self.method.use_strong_view():
            with torch.autocast(own.device.type, enabled=False):  # augment in float32
                own = photometric_view(own, self.semi.strong, self.generator)
                other = photometric_view(other, self.semi.strong, self.generator)
        box = cutmix_boxes(own.shape[0], own.shape[-2:], self.generator, self.semi.cutmix_prob)
        box = box.to(own.device)
        return box, mix(box, other, own)
