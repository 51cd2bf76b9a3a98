"""PGPC (Xiang, Wan and Cao, arXiv 2501.09040): pseudo-label guided pixel contrast, as a
plug-in of the self-training loop. The maths lives in ``pixcli.losses.pgpc``; this module
wires it:

- Projection head (Sec. 4.1): 256-d, L2-normalised, on the decoder features. It is the
  Segmentor's own ``projector`` (``prepare_student`` adds one when the checkpoint has none),
  not a head of the method: so DDP synchronises its gradients with the rest of the model,
  it trains at the decode head's learning rate (6e-4 vs 6e-5, Sec. 4.1), the EMA teacher
  has a copy, and ``model.pt`` carries it (``embed-report`` then shows its embedding). Any
  warmed-up checkpoint works, as for the other methods.
- Everything happens on the model's output grid (stride 4 for DAFormer). The teacher's
  logits on the weak view give, per target cell, the probabilities, the pseudo label
  (argmax), the entropy (Eq. 7) and the class rank order (Eq. 11).
- Anchors (Eq. 8): the student's projections of the mixed image (ClassMix + strong view:
  the student's target forward of the loop, no extra pass) at cells that show only target
  pixels inside the image, whose teacher entropy is in the image's lowest eta fraction
  (the fraction is counted over the whole target crop the teacher sees); at most N_a per
  class. Gradient flows through them into the projection head and the model.
- Banks (no gradient; student projections, detached, of this step's pixels, pushed *before*
  the loss so the current mini-batch counts, Sec. 3.3): per-class queues of source pixels
  by their labels (nearest-neighbour on the grid), whose means are the prototypes (Eq. 9)
  and whose other classes are the source negatives (Eq. 10); a queue of target cells with
  their rank orders, the target negatives (Eq. 11); with ``positives = "target"`` (Table 6
  "TP") per-class queues of reliable target cells by pseudo label give the prototypes.
  Choice: the paper's "momentum-updated" bank (after MoCo v2) is read as a FIFO queue
  refreshed every step; no momentum encoder runs on the source images (an extra pass).
- L_c (Eq. 5) after the warm-up, weighted by lambda_c (Eq. 6). Until then (and on a step
  without anchors) the term is ``0 * sum(proj)``, logged as 0, so that the projection head
  takes part in every backward pass (DDP expects every parameter to get a gradient).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pixcli.data.taxonomy import IGNORE_INDEX
from pixcli.errors import UserError
from pixcli.losses.memory_bank import MemoryBank
from pixcli.losses.pgpc import (
    ClassMemoryBanks,
    PGPCConfig,
    class_rank_order,
    negative_candidates,
    pgpc_contrastive_loss,
    reliable_pixels,
    sample_negatives,
    sample_per_class,
)
from pixcli.methods.base import Method, MethodSetup, StepContext
from pixcli.models.segmentor import Segmentor, add_projection_head


def inside_image(geometry: Tensor, size: tuple[int, int], device: torch.device) -> Tensor:
    """``B x H x W`` bool: which crop pixels lie inside the resized image (not padding).

    ``geometry`` holds ``CropGeometry`` rows (``pixcli.data.training_set.geometry_to_tensor``:
    resized h, w, top, left, crop h, w, flip).
    """
    h, w = size
    rows = torch.arange(h, device=device)[:, None]
    cols = torch.arange(w, device=device)[None, :]
    masks = []
    for resized_h, resized_w, top, left, _, _, flip in geometry.tolist():
        mask = (rows < resized_h - top) & (cols < resized_w - left)
        masks.append(mask.flip(-1) if flip else mask)
    return torch.stack(masks)


def whole_cells(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """``B x h x w`` bool: grid cells all of whose pixels are set in the ``B x H x W`` mask."""
    share = F.interpolate(mask[:, None].float(), size=size, mode="area")[:, 0]
    return share > 1.0 - 1e-6


def grid_rows(maps: Tensor) -> Tensor:
    """``B x D x h x w`` -> ``(B h w) x D`` rows, in the order of ``labels.reshape(-1)``."""
    return maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])


@dataclass
class TargetCells:
    """The teacher's view of the target grid cells, flat in ``labels.reshape(-1)`` order."""

    labels: Tensor  # pseudo label (argmax), long
    reliable: Tensor  # bool, Sec. 3.2 (per image, over the cells inside the image)
    shows_target: Tensor  # bool, the student's mixed input shows only target pixels there
    probs: Tensor  # (cells x C) probabilities


class PGPC(Method):
    name = "pgpc"

    def __init__(self, setup: MethodSetup, cfg: PGPCConfig | None = None) -> None:
        super().__init__(setup)
        self.cfg = cfg = cfg or PGPCConfig()
        if setup.unlabelled is None:
            raise UserError("--method pgpc needs unlabelled target data (--setting uda or semi)")
        classes = setup.num_classes
        if cfg.target_negatives and cfg.rank_r >= classes:
            raise UserError(
                f"pgpc.rank_r = {cfg.rank_r} leaves no target negative among {classes} classes"
            )
        self.start = cfg.start_step(setup.total_steps)
        if cfg.lambda_c > 0 and self.start >= setup.total_steps:
            raise UserError(
                f"pgpc: the contrastive term would start at step {self.start} of a "
                f"{setup.total_steps}-step run; lower pgpc.warmup_iterations"
            )
        dim = cfg.proj_dim
        self.source_bank = ClassMemoryBanks(classes, cfg.bank_size, dim)
        self.target_bank = (
            ClassMemoryBanks(classes, cfg.bank_size, dim) if cfg.positives == "target" else None
        )
        self.negative_bank = (
            MemoryBank(cfg.negative_bank_size, dim, payload_shape=(classes,))
            if cfg.target_negatives
            else None
        )
        self.generator = torch.Generator().manual_seed(2)

    # -- hooks ------------------------------------------------------------------------
    def prepare_student(self, student: Segmentor) -> None:
        add_projection_head(student, self.cfg.proj_dim)

    def losses(self, ctx: StepContext) -> dict[str, Tensor]:
        student_source, student_target = ctx.student_labelled, ctx.student_unlabelled
        if student_source is None or student_target is None or ctx.teacher_output is None:
            return {}
        if student_source.proj is None or student_target.proj is None:
            raise RuntimeError("PGPC needs the student's projection head (prepare_student)")
        target_rows = grid_rows(student_target.proj)
        cells = self._target_cells(ctx)
        with torch.no_grad():
            self._push(ctx, grid_rows(student_source.proj), target_rows, cells)
        keep_alive = student_target.proj.float().sum() * 0.0 + 0.0  # + 0.0: logs 0, not -0
        if ctx.step < self.start:
            return {"contrast": keep_alive}
        anchors = sample_per_class(
            cells.labels, cells.reliable & cells.shows_target, self.cfg.anchors_per_class,
            self.generator,
        )  # fmt: skip
        loss, used = self._contrast(target_rows[anchors], cells.labels[anchors])
        ctx.extras["anchors"] = float(used)
        return {"contrast": self.cfg.lambda_c * loss + keep_alive}

    # -- pieces -----------------------------------------------------------------------
    @torch.no_grad()
    def _target_cells(self, ctx: StepContext) -> TargetCells:
        """The teacher's view of the cells of the ``n`` images the student saw mixed."""
        assert ctx.teacher_output is not None and ctx.student_unlabelled is not None
        assert ctx.unlabelled_image is not None and ctx.unlabelled_geometry is not None
        n, _, h, w = ctx.student_unlabelled.proj.shape  # type: ignore[union-attr]
        logits = ctx.teacher_output.logits[:n].float()
        if logits.shape[-2:] != (h, w):
            raise RuntimeError(f"teacher grid {tuple(logits.shape[-2:])} != student's {(h, w)}")
        probs = logits.softmax(dim=1)
        image = ctx.unlabelled_image[:n]
        inside = inside_image(ctx.unlabelled_geometry[:n], image.shape[-2:], image.device)
        shows = inside if ctx.mix_mask is None else inside & (ctx.mix_mask[:n, 0] < 0.5)
        valid = whole_cells(inside, (h, w))
        reliable = reliable_pixels(probs, self.cfg.eta, self.cfg.anchor_selection, valid)
        rows = grid_rows(probs)
        return TargetCells(
            labels=rows.argmax(dim=1),
            reliable=reliable.reshape(-1),
            shows_target=whole_cells(shows, (h, w)).reshape(-1),
            probs=rows,
        )

    def _push(
        self, ctx: StepContext, source_rows: Tensor, target_rows: Tensor, cells: TargetCells
    ) -> None:
        """This step's rows into the banks (every rank, every step: the pushes gather)."""
        assert ctx.student_labelled is not None
        grid = ctx.student_labelled.proj.shape[-2:]  # type: ignore[union-attr]
        small = F.interpolate(ctx.labelled_label[:, None].float(), size=grid, mode="nearest")
        source_labels = small.reshape(-1).long()
        known = (source_labels != IGNORE_INDEX) & (source_labels < self.setup.num_classes)
        pick = sample_per_class(source_labels, known, self.cfg.bank_push, self.generator)
        self.source_bank.push(source_rows[pick].detach(), source_labels[pick])
        if self.target_bank is not None:
            reliable = cells.reliable & cells.shows_target
            pick = sample_per_class(cells.labels, reliable, self.cfg.bank_push, self.generator)
            self.target_bank.push(target_rows[pick].detach(), cells.labels[pick])
        if self.negative_bank is not None:
            one_group = torch.zeros_like(cells.labels)
            pick = sample_per_class(
                one_group, cells.shows_target, self.cfg.negative_bank_push, self.generator
            )
            ranks = class_rank_order(cells.probs[pick])
            self.negative_bank.push(target_rows[pick].detach(), ranks)

    def _contrast(self, anchors: Tensor, anchor_labels: Tensor) -> tuple[Tensor, int]:
        """L_c (Eq. 5) of these anchors against the banks."""
        bank = self.target_bank if self.target_bank is not None else self.source_bank
        prototypes, present = bank.prototypes()
        pool, source_labels, target_ranks = [], None, None
        if self.cfg.source_negatives:
            feats, source_labels = self.source_bank.get()
            pool.append(feats)
        if self.negative_bank is not None:
            feats, target_ranks = self.negative_bank.get()
            pool.append(feats)
        candidates = negative_candidates(
            self.setup.num_classes, source_labels, target_ranks, self.cfg.rank_r
        )
        index, valid = sample_negatives(candidates, self.cfg.negatives_per_anchor, self.generator)
        negatives = torch.cat(pool)[index]
        return pgpc_contrastive_loss(
            anchors, anchor_labels, prototypes, present, negatives, valid, self.cfg.tau
        )
