"""How hard IPixMatch's inter-pixel loss pulls, against the strong-view cross-entropy (issue
22): on one batch of real images, the teacher's logits of the images and the student's of a
UniMatch strong view (the same checkpoint on both sides, the student in train mode), the
loss values and the norms of their gradients on the student's logits.

    W=runs/semi-quality-0
    python benchmarks/ipixmatch_gradients.py --checkpoint $W/seed0/warmup-1_30/model.pt \
        --images $W/benchmark/target/leftImg8bit/train

Each line: the temperature t, L_IPix (alpha 1, Eq. 2), the strong-view CE (UniMatch's: the
confident pixels, >= 0.95), and how many times larger the CE's gradient is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pixcli.data.mixing import PhotometricConfig, photometric_view  # noqa: E402
from pixcli.data.transforms import normalize  # noqa: E402
from pixcli.losses.ipixmatch import IPixMatchConfig, confident_region, inter_pixel_loss  # noqa: E402
from pixcli.losses.self_training import confident_pseudo_labels, weighted_cross_entropy  # noqa: E402
from pixcli.models.checkpoint import segmentor_from_checkpoint  # noqa: E402


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x).logits
    return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--images", type=Path, required=True, help="a folder of *_leftImg8bit.png")
    p.add_argument("--n", type=int, default=8, help="images in the batch")
    p.add_argument("--crop", type=int, default=64, help="square crop at the top left")
    a = p.parse_args()
    torch.manual_seed(0)
    model, _ = segmentor_from_checkpoint(a.checkpoint)
    files = sorted(a.images.rglob("*_leftImg8bit.png"))[: a.n]
    x = torch.stack([normalize(np.asarray(Image.open(f))) for f in files])
    x = x[..., : a.crop, : a.crop]
    with torch.no_grad():
        teacher = logits(model, x)
    strong = photometric_view(x, PhotometricConfig(), torch.Generator().manual_seed(0))
    student = logits(model.train(), strong).detach().requires_grad_(True)
    labels, weights = confident_pseudo_labels(teacher.softmax(1), 0.95)
    ce = weighted_cross_entropy(student, labels, weights)
    (grad_ce,) = torch.autograd.grad(ce, student)
    cfg = IPixMatchConfig()
    omega = confident_region(teacher, cfg.tau)
    for t in (cfg.temperature, 1.0):
        loss = inter_pixel_loss(teacher, student, omega, t)
        (grad,) = torch.autograd.grad(loss, student)
        print(f"t {t:g}: L_IPix {loss.item():.4f} (|grad| {grad.norm():.2e}), strong CE "
              f"{ce.item():.4f} (|grad| {grad_ce.norm():.2e}): CE's gradient "
              f"{grad_ce.norm() / grad.norm():.0f}x")  # fmt: skip
    sizes = [round(float(np.log(int(m.sum()))), 1) for m in omega]
    print(f"Omega (tau {cfg.tau}): {omega.float().mean():.0%} of the pixels, log|Omega| per "
          f"image {sizes}; confident at 0.95: {weights.mean():.0%}")  # fmt: skip


if __name__ == "__main__":
    main()
