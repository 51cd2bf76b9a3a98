"""CPSL (Li et al., CVPR 2022): class-balanced pixel-level self-labeling, as a plug-in of the
self-training loop. The maths lives in ``pixcli.losses.cpsl``; this module wires it:

- f_SL, a cosine classifier initialised with the L2-normalised prototypes of ``pseudo.h5``
  (Weight Initialization, Eq. 7), and its momentum copy f'_SL (momentum 0.999, Sec. 4.1).
- Target labels (Eq. 1): ``argmax(P_SL * P_ST)``; P_ST is the soft label of ``pseudo.h5``
  cut to the training crop (``PseudoLabelFile.soft_crop`` with the crop's geometry), or with
  ``cpsl.pseudo_labels = "teacher"`` the EMA teacher's weak-view softmax; P_SL is
  f'_SL on the teacher's (f'_SEG's) features of the weak view, upsampled bilinearly to the
  crop. Pixels outside the image (padding) are ignored. CPSL trains on these labels with a
  plain cross-entropy (Eq. 2): the loop's confidence weights are replaced by 1 (with the
  teacher's P_ST they stay, as for ``--method none``).
- L_SL (Eq. 4-6, 12): per image, M pixels sampled class-balanced (Eq. 8-9) from the teacher
  features on the feature grid by the rectified labels (nearest-neighbour downsampled); one
  Sinkhorn over the batch's samples and the memory bank with r = delta_pseudo; the samples
  are pushed into the bank after the step (FIFO, labels aligned).
- delta_pseudo starts at ``pseudo.h5``'s class distribution (Eq. 10) and follows the
  rectified labels' batch distribution with momentum alpha (Eq. 11).
- L_REG (Eq. 13): symmetric KL between the teacher's weak-view prediction and the
  student's strong-view prediction, on the pixels that show the target image (ClassMix
  pastes labelled pixels over the rest).
- Total (Eq. 14): the loop's CE terms + lambda_1 L_SL + lambda_2 L_REG.

Choice: features for f_SL come from the momentum network (teacher), detached; the paper's
Fig. 1 feeds f_SL from the segmentation network, and L_SL trains only the head (Sec. 3.2),
so the two differ only in which features are clustered. The teacher's are stabler and are
the ones the memory bank holds, as in MoCo-style queues.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pixcli.data.taxonomy import IGNORE_INDEX
from pixcli.data.training_set import inside_image
from pixcli.errors import UserError
from pixcli.losses.cpsl import (
    CPSLConfig,
    SelfLabelingHead,
    class_balanced_sample,
    pooled_class_distribution,
    random_sample,
    rectify_pseudo_labels,
    self_labeling_loss,
    soft_cluster_assignment,
    symmetric_kl_consistency,
    update_class_distribution,
)
from pixcli.losses.memory_bank import MemoryBank
from pixcli.losses.self_training import ema_update
from pixcli.methods.base import Method, MethodSetup, StepContext
from pixcli.methods.pseudo_file import PseudoSoftLabels


class CPSL(Method):
    name = "cpsl"
    needs_pseudo_file = True

    def __init__(self, setup: MethodSetup, cfg: CPSLConfig | None = None) -> None:
        super().__init__(setup)
        self.cfg = cfg or CPSLConfig()
        self.head_lr_mult = self.cfg.head_lr / self.cfg.lr  # 5e-4 / 1e-4, Sec. 4.1
        self.soft_labels = PseudoSoftLabels(setup, self.name)
        self.pseudo = self.soft_labels.file
        prototypes = torch.as_tensor(self.pseudo.prototypes, dtype=torch.float32)
        if prototypes.shape != (setup.num_classes, setup.feature_dim):
            raise UserError(
                f"{setup.pseudo}: prototypes are {tuple(prototypes.shape)}, the model needs "
                f"({setup.num_classes}, {setup.feature_dim}); was it made by this model?"
            )
        gen = torch.Generator().manual_seed(0)
        self.head = SelfLabelingHead(setup.num_classes, setup.feature_dim, generator=gen)
        if self.cfg.prototype_init:
            self.head.init_from_prototypes(prototypes, generator=gen)
        self.momentum_head = SelfLabelingHead(setup.num_classes, setup.feature_dim)
        self.momentum_head.load_state_dict(self.head.state_dict())
        self.momentum_head.requires_grad_(False)
        self.bank = MemoryBank(self.cfg.memory_length, setup.feature_dim)
        initial = torch.as_tensor(self.pseudo.class_distribution, dtype=torch.float32)
        self.register_buffer("delta_pseudo", initial.clone())
        self.generator = torch.Generator().manual_seed(1)

    # -- hooks ------------------------------------------------------------------------
    def use_strong_view(self) -> bool:
        return self.cfg.strong_augmentation

    def teacher_momentum(self, default: float) -> float:
        return default if self.cfg.momentum_networks else 0.0

    def target_labels(self, ctx: StepContext) -> tuple[Tensor, Tensor]:
        assert ctx.teacher_output is not None and ctx.unlabelled_image is not None
        online = self.cfg.pseudo_labels == "teacher"
        if online:  # the teacher's P_ST; padding from the crops' geometry, no file read
            assert ctx.teacher_logits is not None and ctx.pseudo_weight is not None
            assert ctx.unlabelled_geometry is not None
            padded = ~inside_image(ctx.unlabelled_geometry).to(ctx.teacher_logits.device)
            p_st = ctx.teacher_logits.float().softmax(1).masked_fill(padded[:, None], 0.0)
        else:
            p_st = self.soft_labels.crops(ctx)  # P_ST cut to the training crops
            padded = p_st.sum(dim=1) == 0
        features = ctx.teacher_output.features
        p_sl = soft_cluster_assignment(self.momentum_head, features.float(), self.cfg.tau)
        p_sl = F.interpolate(p_sl, size=p_st.shape[-2:], mode="bilinear", align_corners=False)
        if not self.cfg.self_labeling:
            p_sl = torch.ones_like(p_st)
        if not self.cfg.self_training:
            p_st = torch.ones_like(p_st)
        labels = rectify_pseudo_labels(p_sl, p_st, ignore=padded)
        ctx.extras["rectified_changed"] = float(
            (labels != (p_st.argmax(1)).masked_fill(padded, IGNORE_INDEX)).float().mean()
        )
        ctx.scratch["rectified"] = labels
        if online:
            return labels, ctx.pseudo_weight.masked_fill(padded, 0.0)
        return labels, torch.ones_like(labels, dtype=torch.float32)

    def losses(self, ctx: StepContext) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if ctx.student_unlabelled is None or ctx.teacher_logits is None:
            return out
        if self.cfg.self_labeling:
            out["sl"] = self.cfg.lambda_sl * self._self_labeling(ctx)
        if self.cfg.strong_augmentation:
            student = F.interpolate(
                ctx.student_unlabelled.logits.float(), size=ctx.teacher_logits.shape[-2:],
                mode="bilinear", align_corners=False,
            )  # fmt: skip
            valid = None if ctx.mix_mask is None else ctx.mix_mask[:, 0] < 0.5
            n = student.shape[0]
            out["reg"] = self.cfg.lambda_reg * symmetric_kl_consistency(
                student, ctx.teacher_logits[:n], valid
            )
        return out

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        samples = ctx.scratch.get("samples")
        if samples is not None:
            self.bank.push(*samples)
        labels = ctx.scratch.get("rectified")
        if labels is not None:
            delta_n = pooled_class_distribution(labels, self.setup.num_classes)
            self.delta_pseudo.copy_(
                update_class_distribution(
                    self.delta_pseudo, delta_n.to(self.delta_pseudo), self.cfg.distribution_momentum
                )
            )
        momentum = self.cfg.momentum if self.cfg.momentum_networks else 0.0
        ema_update(self.momentum_head, self.head, momentum)

    # -- pieces -----------------------------------------------------------------------
    def _self_labeling(self, ctx: StepContext) -> Tensor:
        """L_SL over the batch's class-balanced samples and the memory bank."""
        assert ctx.teacher_output is not None
        features = ctx.teacher_output.features.float()  # B x D x h x w (teacher, no grad)
        labels = ctx.scratch["rectified"]
        small = F.interpolate(labels[:, None].float(), size=features.shape[-2:], mode="nearest")
        small = small[:, 0].long()
        sample = class_balanced_sample if self.cfg.class_balance else random_sample
        feats, labs = [], []
        for f, lab in zip(features, small, strict=True):
            idx, chosen = sample(lab, self.cfg.samples_per_image, self.generator)
            feats.append(f.flatten(1).T[idx])
            labs.append(chosen)
        z = F.normalize(torch.cat(feats), dim=1)
        bank_z, _ = self.bank.get()
        marginal = self.delta_pseudo if self.cfg.class_balance else None
        loss, result = self_labeling_loss(
            self.head, z, bank_z, marginal, self.cfg.tau, self.cfg.epsilon,
            self.cfg.sinkhorn_max_iterations, self.cfg.sinkhorn_tolerance,
        )  # fmt: skip
        ctx.scratch["samples"] = (z.detach(), torch.cat(labs))
        if result is not None:
            ctx.extras["sinkhorn_iters"] = float(result.iterations)
        return loss
