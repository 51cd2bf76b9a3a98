"""PiXL (Gan et al., "Diving Segmentation Model into Pixels") as a plug-in of the
self-training loop. The maths lives in ``pixcli.losses.pixl``; this module wires it:

- Multi-resolution input (Sec. 3.3, A.4.1). The loop's training crop X (paper: 1024 x 1024)
  is the source of both inputs: the student sees X^L = X resized by ``lr_scale`` in the
  loop's own forward passes (``student_input``), so the loop's cross-entropy terms are the
  low-resolution terms of Eq. 12 (logits upsampled to the crop, full-resolution labels);
  here the student runs again on X^H, a window of X^L's size cut from X at full resolution,
  for the labelled crop and for the mixed crop (ClassMix + strong view, A.4.1). Windows are
  random for the first ``entropy_crop_start`` iterations, then the window of highest mean
  entropy of the student's X^L prediction, image by image (pixcli's choice of entropy map:
  the prediction the step already has, for labelled and unlabelled crops alike). The EMA
  teacher (Eq. 15-16: the loop's ramp) labels the whole weak crop at full resolution.
- Eq. 12: ``lambda_H`` times the cross-entropy of both X^H predictions (labels cut from the
  crop's labels; the mixed crop keeps its Eq. 11 confidence weights) adds to the loop's two
  low-resolution terms.
- PSP (Eq. 4, 17): per image, its X^L and X^H pixels on the model's output grid (labels
  nearest-neighbour downsampled, ignored pixels dropped) are split at the ``1 - eta``
  quantile of the student's per-pixel entropy; eta follows ``eta_at`` over the run.
- Local prototypes (Eq. 5) from the joint pixels of all images of the step, per resolution,
  with counts; APG (Eq. 8) picks one per class; L_DPA (Eq. 6-7) pulls every drift pixel
  (both resolutions, both images) to its class prototype, prototypes under stop-gradient.
  The "two images of a step" are the labelled and the mixed image (batch size 1 per stream);
  with larger batches all images of the step form the local distribution, each partitioned
  on its own. In the supervised setting (no unlabelled stream) the step's labelled images
  are the distributions.
- L_FD (Eq. 13-14): on the labelled X^H (pixcli's choice: the X^L pass belongs to the
  loop, whose backbone maps the method never sees), between the student's last backbone map
  and a frozen copy of the backbone with its ImageNet weights (rebuilt from the model's
  ``pretrained`` / ``weights_file``; held outside the checkpointed state), on thing-class
  cells. Off without an ImageNet-pretrained backbone, in the supervised setting, or with
  ``lambda_fd = 0``.

Every term is computed per rank from the rank's own images: the local distribution of a step
is the images of that step, so nothing is gathered across processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pixcli.data.taxonomy import IGNORE_INDEX
from pixcli.engine.imagenet_fd import ImageNetFeatureDistance, has_imagenet_weights
from pixcli.engine.inference import resize_map
from pixcli.errors import UserError
from pixcli.losses.pixl import (
    PiXLConfig,
    adaptive_prototypes,
    drift_pixel_contrast,
    entropy_window,
    eta_at,
    local_prototypes,
    low_resolution_size,
    partition_pixels,
    pixel_entropy,
    random_window,
)
from pixcli.losses.self_training import weighted_cross_entropy
from pixcli.methods.base import Method, MethodSetup, StepContext
from pixcli.models.segmentor import Segmentor, SegOutput, add_projection_head


@dataclass
class View:
    """One stream's crops at one step: the full-resolution crop with its labels and weights,
    and the student's output on its low-resolution version (from the loop)."""

    image: Tensor  # (B, 3, H, W) the crop X
    label: Tensor  # (B, H, W)
    weight: Tensor  # (B, H, W) cross-entropy weights (1 for labelled images)
    low: SegOutput  # student on X^L


@dataclass
class PixelSet:
    """Valid pixels of several feature maps, flattened: features (with gradient), labels,
    cross-entropy weights, entropies, image index and resolution (0 low, 1 high)."""

    features: Tensor
    labels: Tensor
    weights: Tensor
    entropy: Tensor
    image: Tensor
    high: Tensor


@dataclass
class FeatureMap:
    """One student output to draw pixels from: its labels and their cross-entropy weights at
    input resolution, the index of each of its images in the step, and its resolution."""

    output: SegOutput
    label: Tensor  # (B, H, W)
    weight: Tensor  # (B, H, W) 1 with a label, Eq. 11's share with a pseudo label
    image: Tensor  # (B,) image indices; X^L and X^H of one image share it
    high: bool


def pixel_set(maps: list[FeatureMap], use_projection: bool) -> PixelSet:
    """The valid pixels of ``maps`` on their output grids, flattened (labels and weights
    nearest-neighbour downsampled to the grid; ignored pixels dropped)."""
    parts: list[tuple[Tensor, ...]] = []
    for m in maps:
        feats = m.output.proj if use_projection else m.output.features
        if feats is None:
            raise UserError("pixl.use_projection needs a model with a projection head (proj_dim)")
        _, d, h, w = feats.shape
        lab = F.interpolate(m.label[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
        wgt = F.interpolate(m.weight[:, None].float(), size=(h, w), mode="nearest")[:, 0]
        parts.append(
            (
                feats.permute(0, 2, 3, 1).reshape(-1, d),
                lab.reshape(-1),
                wgt.reshape(-1),
                pixel_entropy(m.output.logits).reshape(-1),
                m.image.to(feats.device).repeat_interleave(h * w),
                torch.full((lab.numel(),), m.high, device=feats.device),
            )
        )
    f, y, wt, e, i, r = (torch.cat(x) for x in zip(*parts, strict=True))
    valid = y != IGNORE_INDEX
    return PixelSet(f[valid], y[valid], wt[valid], e[valid], i[valid], r[valid])


def crop_windows(x: Tensor, boxes: list[tuple[int, int]], size: tuple[int, int]) -> Tensor:
    """Cut ``size`` windows at ``boxes`` (top, left), one per image, from ``(B, ...)`` maps."""
    h, w = size
    return torch.stack([x[b, ..., t : t + h, s : s + w] for b, (t, s) in enumerate(boxes)])


class PiXL(Method):
    name = "pixl"
    # DACS's ClassMix between the two images of a step (A.4.1), semi included: the paper's,
    # and what `auto` picks. UniMatch's step (`self_training.consistency = "unimatch"`) is a
    # pixcli option: PiXL's X^L / X^H terms on its first strong view, with its labels.
    steps = ("dacs", "unimatch")
    paper_step = "dacs"

    def __init__(self, setup: MethodSetup, cfg: PiXLConfig | None = None) -> None:
        super().__init__(setup)
        self.cfg = cfg or PiXLConfig()
        self.generator = torch.Generator().manual_seed(2)
        self._fd: bool | None = None  # decided at the first step, from the student's config
        self._imagenet: ImageNetFeatureDistance | None = None  # frozen copy, not a module

    # -- hooks ------------------------------------------------------------------------
    def prepare_student(self, student: Segmentor) -> None:
        if self.cfg.use_projection:
            add_projection_head(student, self.cfg.proj_dim)

    def student_input(self, image: Tensor) -> Tensor:
        """X^L: the crop resized by ``lr_scale`` (antialiased bilinear, as inference)."""
        return resize_map(image, low_resolution_size(tuple(image.shape[-2:]), self.cfg.lr_scale))

    def losses(self, ctx: StepContext) -> dict[str, Tensor]:
        assert ctx.student is not None and ctx.student_labelled is not None
        cfg = self.cfg
        labelled = ctx.labelled_label
        views = [View(ctx.labelled_image, labelled, torch.ones_like(labelled, dtype=torch.float32),
                      ctx.student_labelled)]  # fmt: skip
        if ctx.student_unlabelled is not None:
            assert ctx.mixed_image is not None and ctx.mixed_label is not None
            assert ctx.mixed_weight is not None
            views.append(
                View(ctx.mixed_image, ctx.mixed_label, ctx.mixed_weight, ctx.student_unlabelled)
            )
        use_fd = self._fd_enabled(ctx)
        maps: list[FeatureMap] = []
        ce = torch.zeros((), device=ctx.labelled_image.device)
        fd = None
        first = 0  # index of the view's first image among the step's images
        for k, view in enumerate(views):
            ids = torch.arange(first, first + view.label.shape[0])
            first += view.label.shape[0]
            size = (view.image.shape[-2], view.image.shape[-1])
            window = low_resolution_size(size, cfg.lr_scale)
            boxes = self.windows(ctx.step, view.low.logits, view.label, size, window)
            image = crop_windows(view.image, boxes, window)
            label = crop_windows(view.label, boxes, window)
            weight = crop_windows(view.weight, boxes, window)
            if k == 0 and use_fd:
                assert self._imagenet is not None
                high, fd = self._imagenet(ctx.student, image, label)
            else:
                high = ctx.student(image)
            logits = resize_map(high.logits.float(), window)  # up to X^H's own size
            ce = ce + weighted_cross_entropy(logits, label, weight)
            maps.append(FeatureMap(view.low, view.label, view.weight, ids, high=False))
            maps.append(FeatureMap(high, label, weight, ids, high=True))
        out = {"ce_high": cfg.lambda_h * ce}
        if fd is not None:
            out["fd"] = cfg.lambda_fd * fd
        if cfg.dpa:
            out["dpa"] = cfg.lambda_dpa * self._dpa(ctx, maps)
        ctx.extras["entropy_crop"] = float(ctx.step >= cfg.entropy_crop_start)
        return out

    # -- pieces -----------------------------------------------------------------------
    def windows(
        self,
        step: int,
        low_logits: Tensor,
        label: Tensor,
        size: tuple[int, int],
        window: tuple[int, int],
    ) -> list[tuple[int, int]]:
        """(top, left) of each image's X^H in its crop: random before ``entropy_crop_start``,
        then the highest-entropy window of the X^L prediction (ignored pixels count 0)."""
        if step < self.cfg.entropy_crop_start:
            return [random_window(size, window, self.generator) for _ in range(label.shape[0])]
        entropy = pixel_entropy(low_logits)
        grid = entropy.shape[-2:]
        small = F.interpolate(label[:, None].float(), size=grid, mode="nearest")[:, 0]
        entropy = entropy.masked_fill(small == IGNORE_INDEX, 0.0)
        return [entropy_window(e, size, window) for e in entropy]

    def _dpa(self, ctx: StepContext, maps: list[FeatureMap]) -> Tensor:
        """PSP, local prototypes, APG and L_DPA over the step's images (Eq. 4-8)."""
        cfg = self.cfg
        pixels = pixel_set(maps, cfg.use_projection)
        eta = eta_at(ctx.step, self.setup.total_steps, cfg.eta_start, cfg.eta_end)
        joint = partition_pixels(pixels.entropy, pixels.image, eta)
        c = self.setup.num_classes
        low, n_low = local_prototypes(pixels.features, pixels.labels, joint & ~pixels.high, c)
        high, n_high = local_prototypes(pixels.features, pixels.labels, joint & pixels.high, c)
        prototypes, present = adaptive_prototypes(low, n_low, high, n_high, cfg.apg)
        drift = ~joint
        ctx.extras["eta"] = eta
        ctx.extras["drift_fraction"] = float(drift.float().mean()) if drift.numel() else 0.0
        ctx.extras["prototypes"] = float(present.sum())
        weights = pixels.weights[drift] if cfg.dpa_pseudo_weight else None
        return drift_pixel_contrast(
            pixels.features[drift], pixels.labels[drift], prototypes, present, cfg.tau, weights
        )

    def _fd_enabled(self, ctx: StepContext) -> bool:
        """L_FD is on with lambda_fd > 0, an unlabelled stream and an ImageNet-pretrained
        backbone; the frozen ImageNet copy is built the first time it is needed."""
        if self._fd is not None:
            return self._fd
        pretrained = has_imagenet_weights(ctx.student)
        self._fd = bool(self.cfg.lambda_fd > 0 and self.setup.unlabelled is not None and pretrained)
        if self._fd:
            self._imagenet = ImageNetFeatureDistance(
                ctx.student, ctx.labelled_image.device, self.cfg.fd_thing_classes,
                self.cfg.fd_min_ratio, name="pixl.fd_thing_classes",
            )  # fmt: skip
        return self._fd
