"""The floor pixcli must stand on: plain PyTorch + timm, no pixcli imports (issue 17).

Source-only, oracle and mean-teacher self-training (EMA teacher, per-image confidence weight,
ClassMix, colour jitter) at one budget, scored as pixcli scores (mIoU over classes present).
  python benchmarks/plain_reference.py --source gta5:B/source --target cityscapes:B/target
Datasets: gta5:/cityscapes: (labelIds) or folder: (train ids, images/ and labels/ per split).
"""

import argparse
import json
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
       26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}  # fmt: skip
TABLE = np.full(256, 255, np.uint8)
TABLE[list(IDS)] = list(IDS.values())


def load(spec: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    kind, root = spec.split(":", 1)
    root = Path(root)
    if kind == "gta5":
        pairs = [(p, root / "labels" / p.name) for p in sorted((root / "images").glob("*.png"))]
    elif kind == "cityscapes":
        imgs = sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
        gt = root / "gtFine" / split
        pairs = [(p, gt / p.parent.name / p.name.replace("leftImg8bit", "gtFine_labelIds"))
                 for p in imgs]  # fmt: skip
    else:
        pairs = [(p, root / "labels" / split / (p.stem + ".png"))
                 for p in sorted((root / "images" / split).glob("*"))]  # fmt: skip
    x = np.stack([np.asarray(Image.open(a).convert("RGB")) for a, _ in pairs])
    y = np.stack([np.asarray(Image.open(b)) for _, b in pairs])
    y = y if kind == "folder" else TABLE[y]
    return torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255), torch.from_numpy(y).long()


class Net(nn.Module):  # ResNet-18, features of strides 4/8/16 concatenated at stride 4
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.body = timm.create_model("resnet18", features_only=True, out_indices=(1, 2, 3))
        width = sum(self.body.feature_info.channels())
        conv = nn.Conv2d(width, 128, 3, padding=1, bias=False)
        self.fuse = nn.Sequential(conv, nn.BatchNorm2d(128), nn.ReLU(), nn.Conv2d(128, classes, 1))
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.body((x - self.mean) / self.std)
        f = [F.interpolate(t, size=f[0].shape[-2:], mode="bilinear") for t in f]
        return F.interpolate(self.fuse(torch.cat(f, 1)), size=x.shape[-2:], mode="bilinear")


def batch(x, y, n, crop, g):  # random scale 0.75-1.5, crop, flip
    i = torch.randint(len(x), (n,), generator=g)
    s = float(torch.empty(1).uniform_(0.75, 1.5, generator=g))
    size = [max(crop, int(d * s)) for d in x.shape[-2:]]
    xi = F.interpolate(x[i], size=size, mode="bilinear")
    yi = F.interpolate(y[i, None].float(), size=size, mode="nearest")[:, 0].long()
    t, left = (int(torch.randint(d - crop + 1, (1,), generator=g)) for d in size)
    xi, yi = xi[..., t : t + crop, left : left + crop], yi[..., t : t + crop, left : left + crop]
    if torch.rand(1, generator=g) < 0.5:
        xi, yi = xi.flip(-1), yi.flip(-1)
    return xi, yi


def jitter(x, g):  # brightness, contrast, saturation per image
    b, c, s = (1 + 0.4 * (torch.rand(3, len(x), 1, 1, 1, generator=g) - 0.5) * 2).unbind(0)
    grey = x.mean(1, keepdim=True)
    return ((grey + (x - grey) * s) * b - x.mean((1, 2, 3), keepdim=True)).mul(c).add(
        x.mean((1, 2, 3), keepdim=True)).clamp(0, 1)  # fmt: skip


def train(net, x, y, a, teacher=None, xt=None):
    g = torch.Generator().manual_seed(a.seed)
    opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=0.01)
    for it in range(a.iterations):
        for group in opt.param_groups:
            group["lr"] = a.lr * (1 - it / a.iterations) ** 0.9
        xs, ys = batch(x, y, a.batch, a.crop, g)
        loss = F.cross_entropy(net(jitter(xs, g)), ys, ignore_index=255)
        if teacher is not None:
            xu, _ = batch(xt, torch.zeros_like(xt[:, 0]).long(), a.batch, a.crop, g)
            with torch.no_grad():
                conf, pl = teacher(xu).softmax(1).max(1)
            w = (conf > 0.968).float().mean((1, 2), keepdim=True).expand_as(conf)
            m = torch.zeros_like(ys, dtype=torch.bool)  # ClassMix: half the source classes
            for k in range(len(ys)):
                cls = ys[k].unique()
                cls = cls[cls != 255]
                pick = torch.randperm(len(cls), generator=g)[: len(cls) // 2]
                m[k] = torch.isin(ys[k], cls[pick])
            xm = torch.where(m[:, None], xs, xu)
            ym, wm = torch.where(m, ys, pl), torch.where(m, torch.ones_like(w), w)
            ce = F.cross_entropy(net(jitter(xm, g)), ym, ignore_index=255, reduction="none")
            loss = loss + (ce * wm).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                pairs = zip(teacher.state_dict().values(), net.state_dict().values(), strict=True)
                for pt, ps in pairs:
                    pt.copy_(pt * a.ema + ps * (1 - a.ema) if pt.is_floating_point() else ps)
            continue
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


@torch.no_grad()
def miou(net, x, y, classes=19):
    net.eval()
    conf = torch.zeros(classes * classes, dtype=torch.long)
    for i in range(0, len(x), 16):
        p, t = net(x[i : i + 16]).argmax(1), y[i : i + 16]
        conf += torch.bincount(t[t != 255] * classes + p[t != 255], minlength=classes**2)
    net.train()
    c = conf.view(classes, classes).double()
    iou = c.diag() / (c.sum(0) + c.sum(1) - c.diag())
    return float(iou[~iou.isnan()].mean() * 100), [round(float(v) * 100, 1) for v in iou]


def main() -> None:
    p = argparse.ArgumentParser()
    for k, v in (("--source", ""), ("--target", ""), ("--out", ""), ("--iterations", 800),
                 ("--adapt-iterations", 800), ("--batch", 8), ("--adapt-batch", 4),
                 ("--crop", 128), ("--lr", 1e-3), ("--ema", 0.99), ("--seed", 0),
                 ("--threads", 0)):  # fmt: skip
        p.add_argument(k, type=type(v), default=v)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    xs, ys = load(a.source, "train")
    xt, yt = load(a.target, "train")
    xv, yv = load(a.target, "val")
    torch.manual_seed(a.seed)
    source = train(Net(19), xs, ys, a)
    oracle = train(Net(19), xt, yt, a)
    teacher = Net(19).requires_grad_(False).eval()
    teacher.load_state_dict(source.state_dict())
    a.iterations, a.batch = a.adapt_iterations, a.adapt_batch
    student = Net(19)
    student.load_state_dict(source.state_dict())
    res = {"source_only": miou(source, xv, yv), "oracle": miou(oracle, xv, yv)}
    res["self_training"] = miou(train(student, xs, ys, a, teacher, xt), xv, yv)
    gap = res["oracle"][0] - res["source_only"][0]
    res["gap_share"] = (res["self_training"][0] - res["source_only"][0]) / gap if gap else 0.0
    print(json.dumps({k: v if isinstance(v, float) else v[0] for k, v in res.items()}))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
