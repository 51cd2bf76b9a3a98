"""Distillation (ProDA Sec. 3.4, CPSL Sec. 4.2 "CPSL+distill") as a plug-in of the
self-training loop; ``pixcli distill`` runs it in rounds on a fresh student. The maths lives
in ``pixcli.losses.distillation``; this module wires it:

- The teacher is ``pseudo.h5``, written by ``pixcli pseudolabel`` from the teacher model
  (flip-averaged, ``ignore_below`` = the threshold). Each unlabelled image's soft labels
  ``p_T`` are cut to its training crop (``PseudoLabelFile.soft_crop`` with the crop's
  geometry, bilinear from the label grid to pixels).
- Target labels: ``y_T = argmax p_T``, ignored where ``max p_T < threshold`` (0.95) or
  outside the image; plain cross-entropy on them (weights 1, no confidence weighting).
  The loop's own EMA teacher (an average of the student) plays no part in the labels or
  the KL term; it still runs on the weak view every step, as the loop has no switch for it.
- Extra loss: ``weight * KL(p_T || p_S)`` with ``p_S`` the student on the strong view (the
  crop's geometry, photometric changes only), on every target pixel of the crop: pixels
  where ClassMix pasted labelled content, and padding, are left out.
- Source cross-entropy is the loop's labelled term.

Choice (documented in README): ``p_T`` is the teacher's stored prediction on the clean,
whole, flip-averaged image, not the teacher run again on the student's strong view as the
published ProDA code does (``teacher(target_imageS)`` in ``step_distillation``). So the hard
labels and the KL target come from the same prediction, no teacher network sits in memory
or runs per step, and the student learns the teacher's best prediction under a perturbed
input. The price: the soft labels are quantised to 1/255 and stored at the model's output
stride.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pixcli.data.taxonomy import IGNORE_INDEX
from pixcli.losses.distillation import KDConfig, confident_labels, distillation_kl
from pixcli.methods.base import Method, MethodSetup, StepContext
from pixcli.methods.pseudo_file import PseudoSoftLabels


class Distill(Method):
    name = "distill"
    needs_pseudo_file = True

    def __init__(self, setup: MethodSetup, cfg: KDConfig | None = None) -> None:
        super().__init__(setup)
        self.cfg = cfg or KDConfig()
        # the teacher's labels, by design not the student checkpoint's: no warning
        self.soft_labels = PseudoSoftLabels(setup, self.name, from_other_model=True)

    def target_labels(self, ctx: StepContext) -> tuple[Tensor, Tensor]:
        p_t = self.soft_labels.crops(ctx)
        ctx.scratch["teacher_probs"] = p_t
        labels = confident_labels(p_t, self.cfg.threshold)
        ctx.extras["confident"] = float((labels != IGNORE_INDEX).float().mean())
        return labels, torch.ones_like(labels, dtype=torch.float32)

    def losses(self, ctx: StepContext) -> dict[str, Tensor]:
        p_t = ctx.scratch.get("teacher_probs")
        if p_t is None or ctx.student_unlabelled is None or self.cfg.weight == 0:
            return {}
        student = F.interpolate(
            ctx.student_unlabelled.logits.float(), size=p_t.shape[-2:], mode="bilinear",
            align_corners=False,
        )  # fmt: skip
        n = student.shape[0]  # ClassMix mixes min(labelled, unlabelled) images
        p_t = p_t[:n]
        valid = p_t.sum(dim=1) > 0
        if ctx.mix_mask is not None:
            valid &= ctx.mix_mask[:, 0] < 0.5
        return {"kd": self.cfg.weight * distillation_kl(student, p_t, valid)}
