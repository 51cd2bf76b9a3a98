"""The plug-in interface of the self-training loop (``pixcli.engine.self_training``).

A method is an ``nn.Module`` (so its heads and buffers — memory banks, running class
distributions — are trained, saved and resumed with the run) that may:

- hold extra heads, trained at ``lr * head_lr_mult`` (its parameters);
- change the student before training (``prepare_student``), e.g. give it a projection head
  (then DDP, the EMA teacher and ``model.pt`` include it);
- choose what the student sees of a training crop (``student_input``), e.g. PiXL's
  low-resolution view;
- change the target labels and their weights (``target_labels``), e.g. CPSL's rectification;
- add loss terms (``losses``), already weighted;
- update its state after the optimiser step (``after_step``), e.g. queues and momentum heads.

The loop knows no method by name. ``Method`` itself is the plain self-training baseline
(``--method none``): the teacher's pseudo labels, unchanged, and no extra loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from pixcli.data.readers import SegDataset
from pixcli.models.segmentor import Segmentor, SegOutput


@dataclass
class MethodSetup:
    """What a method may need to build itself."""

    num_classes: int
    feature_dim: int
    device: torch.device
    unlabelled: SegDataset | None = None  # the unlabelled stream's dataset (target)
    pseudo: Path | None = None  # pseudo.h5 from `pixcli pseudolabel`
    total_steps: int = 1
    # what pseudo.h5 must have been made from (its checkpoint / dataset_fingerprint
    # attributes), when known: the run's --checkpoint and its whole --target
    checkpoint_fingerprint: str | None = None
    target_fingerprint: str | None = None


@dataclass
class StrongView:
    """One student input made from the unlabelled batch, with the teacher's word on it.

    ``teacher_logits`` are the teacher's weak-view logits at the input resolution, mixed the
    way ``image`` was (CutMix pastes the partner image's logits too); ``valid`` marks the
    pixels that have them (not padding, not pixels pasted from a labelled image).
    """

    image: Tensor  # (B, 3, H, W) the student's input: mixed, strong
    teacher_logits: Tensor  # (B, C, H, W)
    valid: Tensor  # (B, H, W) bool
    student: SegOutput  # the student on ``image``


@dataclass
class StepContext:
    """One step's tensors, at the input resolution unless said otherwise.

    ``student_*`` outputs are at the model's output stride (``SegOutput``), on the method's
    ``student_input`` of the crop (the crop itself by default). ``mix_mask`` is 1 where the
    mixed image shows another image than the unlabelled one: the labelled image (DACS's
    ClassMix) or the partner unlabelled image (UniMatch's CutMix, first strong view); None
    without mixing.
    """

    step: int
    labelled_image: Tensor
    labelled_label: Tensor
    unlabelled_image: Tensor | None = None  # weak view
    unlabelled_index: Tensor | None = None  # dataset indices
    unlabelled_geometry: Tensor | None = None  # (B, 7) CropGeometry rows
    teacher_logits: Tensor | None = None  # teacher on the weak view, full resolution
    teacher_output: SegOutput | None = None  # teacher's raw output on the weak view
    pseudo_label: Tensor | None = None  # (B, H, W) after the method's hook
    pseudo_weight: Tensor | None = None  # (B, H, W)
    # the loop's own pseudo labels before the method's hook (the teacher's argmax); the
    # pseudo-label monitor compares them with the hooked ones when a method changes them
    loop_label: Tensor | None = None
    mix_mask: Tensor | None = None
    mixed_image: Tensor | None = None  # the unlabelled crop, mixed + strong (student_input)
    mixed_label: Tensor | None = None  # (B, H, W) labels of mixed_image (mixed pseudo labels)
    mixed_weight: Tensor | None = None  # (B, H, W) their weights
    student_labelled: SegOutput | None = None
    student_unlabelled: SegOutput | None = None
    strong_views: list[StrongView] = field(default_factory=list)  # every student input made
    # from the unlabelled batch (DACS: one; UniMatch: one or two; student_unlabelled = first)
    extras: dict = field(default_factory=dict)  # floats to log
    scratch: dict = field(default_factory=dict)  # a method's tensors between its hooks
    student: nn.Module | None = None  # the student as the loop calls it (DDP-wrapped), for
    # methods that run it on more inputs (PiXL's high-resolution crops)


class Method(nn.Module):
    """The baseline; subclasses override what their paper adds."""

    name = "none"
    needs_pseudo_file = False
    head_lr_mult = 1.0  # lr of the method's own parameters, relative to the backbone lr
    steps: tuple[str, ...] = ("dacs", "unimatch")  # unlabelled steps it works with, preferred first
    # the step of the method's paper, which `self_training.consistency = "auto"` takes in
    # every setting (None: DACS's for UDA, UniMatch's for --setting semi)
    paper_step: str | None = None

    def __init__(self, setup: MethodSetup) -> None:
        super().__init__()
        self.setup = setup

    def prepare_student(self, student: Segmentor) -> None:
        """Change the student before the teacher is copied from it and DDP wraps it
        (default: nothing)."""

    def use_strong_view(self) -> bool:
        """Whether the student sees the strong (photometric) view of the unlabelled images."""
        return True

    def student_input(self, image: Tensor) -> Tensor:
        """What the student sees of a training crop (default: the crop itself). The loop's
        cross-entropy terms upsample the student's logits to the crop's size either way."""
        return image

    def teacher_momentum(self, default: float) -> float:
        """EMA momentum of the teacher at this step (default: the loop's)."""
        return default

    def target_labels(self, ctx: StepContext) -> tuple[Tensor, Tensor]:
        """Labels and per-pixel weights for the unlabelled images (default: unchanged)."""
        assert ctx.pseudo_label is not None and ctx.pseudo_weight is not None
        return ctx.pseudo_label, ctx.pseudo_weight

    def losses(self, ctx: StepContext) -> dict[str, Tensor]:
        """Extra loss terms, already weighted (default: none)."""
        return {}

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        """State updates after the optimiser step (default: none)."""
