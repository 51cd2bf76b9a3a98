"""Output-space discriminator for adversarial warm-up (AdaptSegNet, Tsai et al. CVPR 2018).

Fully convolutional: five 4x4 convolutions with stride 2 and LeakyReLU(0.2), channels
ndf, 2ndf, 4ndf, 8ndf, 1; it scores every patch of a softmax map as source or target.
"""

from __future__ import annotations

from torch import Tensor, nn


class OutputDiscriminator(nn.Module):
    def __init__(self, num_classes: int, ndf: int = 64) -> None:
        super().__init__()
        chans = [num_classes, ndf, ndf * 2, ndf * 4, ndf * 8]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:], strict=True):
            layers += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(chans[-1], 1, 4, stride=2, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, probs: Tensor) -> Tensor:
        return self.net(probs)
