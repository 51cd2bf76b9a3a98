"""Diagnostic: the plain reference's self-training loop driving a pixcli checkpoint (issue 17).

When `pixcli adapt` does worse than `benchmarks/plain_reference.py`, this separates the two
suspects: the loop or the model. It loads a pixcli warm-up `model.pt`, runs the plain script's
own mean-teacher loop on it (same data reading, batches, ClassMix, EMA, metric) and prints the
student's and the teacher's target val mIoU before and after.

    python benchmarks/plain_loop_on_checkpoint.py --checkpoint runs/warmup/model.pt \
        --source gta5:B/source --target cityscapes:B/target --iterations 120

Found with it: on the dusk benchmark a DeepLabV3+ warm-up (16.7) fell to 16.1 (teacher 13.8)
in the plain loop too, as in pixcli's (11.8), so the CPU recipe moved to hypercolumns.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import plain_reference as plain  # noqa: E402
from pixcli.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from pixcli.engine.inference import upsampled_logits  # noqa: E402
from pixcli.models.checkpoint import segmentor_from_checkpoint  # noqa: E402


class PlainInterface(nn.Module):
    """A pixcli Segmentor seen as the plain script's nets: 0..1 images in, full-size logits
    out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return upsampled_logits(self.model, (x - self.mean) / self.std)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--source", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--iterations", type=int, default=120)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.99)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    xs, ys = plain.load(a.source, "train")
    xt, _ = plain.load(a.target, "train")
    xv, yv = plain.load(a.target, "val")
    student = PlainInterface(segmentor_from_checkpoint(a.checkpoint)[0]).train()
    before = plain.miou(student, xv, yv)[0]
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    torch.manual_seed(a.seed)
    plain.train(student, xs, ys, a, teacher, xt)
    result = {
        "before": round(before, 1),
        "student": round(plain.miou(student, xv, yv)[0], 1),
        "teacher": round(plain.miou(teacher, xv, yv)[0], 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
