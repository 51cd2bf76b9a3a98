"""IPixMatch (Wu, Li & Xiao): the inter-pixel relation loss as a plug-in of the loop. The
maths lives in ``pixcli.losses.ipixmatch``; this module wires it.

- L_o (Eq. 6) is the loop's: UniMatch's step for ``--setting semi`` (the paper's base
  method, Sec. IV-B), DACS's for ``--setting uda``.
- The loss compares the teacher's weak-view logits with the student's logits on each strong
  view (Sec. III-B, Fig. 1: "the student model leverages strongly augmented images"); with
  UniMatch's two strong views, the mean of the two. The teacher logits are cut-mixed like
  the view (``StrongView.teacher_logits``), so both sides describe the same pixels.
- Both sides at the input resolution: the teacher's logits as the loop upsamples them, the
  student's upsampled bilinearly alike (UniMatch's DeepLabV3+ returns input-size logits).
- Omega (Eq. 3) is restricted to the view's valid pixels: padding and, under ClassMix,
  pixels pasted from a labelled image have no teacher prediction.
- alpha * exp(-5 (1 - i/i_w)^2) with i the loop's step and i_w = warmup_fraction of the run.
- Not used: the feature-perturbation stream (the paper names strong images only).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from pixcli.errors import UserError
from pixcli.losses.ipixmatch import (
    DISTANCES,
    IPixMatchConfig,
    confident_region,
    inter_pixel_loss,
    ramp_up,
)
from pixcli.methods.base import Method, MethodSetup, StepContext


class IPixMatch(Method):
    name = "ipixmatch"

    def __init__(self, setup: MethodSetup, cfg: IPixMatchConfig | None = None) -> None:
        super().__init__(setup)
        self.cfg = cfg or IPixMatchConfig()
        if self.cfg.distance not in DISTANCES:
            raise UserError(
                f"ipixmatch.distance {self.cfg.distance!r}: expected one of {', '.join(DISTANCES)}"
            )
        if not 0 <= self.cfg.warmup_fraction <= 1:
            raise UserError(f"ipixmatch.warmup_fraction {self.cfg.warmup_fraction}: not in [0, 1]")
        if setup.unlabelled is None:
            raise UserError("--method ipixmatch needs unlabelled data (--setting semi or uda)")
        self.warmup_steps = round(self.cfg.warmup_fraction * setup.total_steps)

    def losses(self, ctx: StepContext) -> dict[str, Tensor]:
        if not ctx.strong_views:
            return {}
        terms, omega_share = [], []
        for view in ctx.strong_views:
            omega = confident_region(view.teacher_logits, self.cfg.tau, view.valid)
            student = F.interpolate(
                view.student.logits.float(), size=view.image.shape[-2:], mode="bilinear",
                align_corners=False,
            )  # fmt: skip
            terms.append(
                inter_pixel_loss(
                    view.teacher_logits, student, omega, self.cfg.temperature, self.cfg.distance
                )
            )
            omega_share.append(omega.float().mean())
        loss = sum(terms) / len(terms)
        alpha = self.cfg.alpha * ramp_up(ctx.step, self.warmup_steps)
        ctx.extras["ipix_raw"] = loss.detach()
        ctx.extras["ipix_omega"] = sum(omega_share) / len(omega_share)
        return {"ipix": alpha * loss}
