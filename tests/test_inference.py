import pytest
import torch
from torch import nn

from pixcli.engine.inference import InferenceConfig, predict_logits, window_starts
from pixcli.errors import UserError
from pixcli.models import SegmentorConfig, build_segmentor
from pixcli.models.segmentor import SegOutput


class PointwiseModel(nn.Module):
    """A 1x1 convolution: every window sees the same per-pixel logits, so sliding-window
    averaging must give back exactly the whole-image logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> SegOutput:
        out = self.conv(x)
        return SegOutput(logits=out, features=out, proj=None)


def test_window_starts_cover_and_stay_inside():
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(11, 4, 3) == [0, 3, 6, 7]  # last window shifted back inside
    assert window_starts(4, 8, 3) == [0]  # image smaller than window
    for size, win, stride in [(37, 8, 5), (100, 33, 11), (9, 9, 4)]:
        starts = window_starts(size, win, stride)
        covered = set()
        for s in starts:
            assert s >= 0 and s + win <= size
            covered.update(range(s, s + win))
        assert covered == set(range(size))


def test_sliding_equals_whole_for_pointwise_model_with_overlaps():
    torch.manual_seed(0)
    model = PointwiseModel().eval()
    x = torch.randn(2, 3, 23, 31)
    whole = predict_logits(model, x, InferenceConfig())
    slide = predict_logits(model, x, InferenceConfig(window=(8, 12), stride=(5, 7), window_batch=3))
    assert torch.allclose(whole, slide, atol=1e-5)


def test_sliding_equals_whole_when_window_covers_the_image():
    torch.manual_seed(0)
    model = build_segmentor(SegmentorConfig(backbone="test_resnet", num_classes=5, feature_dim=16))
    model.eval()
    x = torch.randn(1, 3, 64, 96)
    whole = predict_logits(model, x, InferenceConfig())
    for window in [(64, 96), (128, 128)]:  # exactly the image, and larger than it
        slide = predict_logits(model, x, InferenceConfig(window=window, stride=(32, 32)))
        assert torch.allclose(whole, slide, atol=1e-5)


def test_flip_averages_both_directions():
    model = PointwiseModel().eval()
    x = torch.randn(1, 3, 5, 7)
    plain = predict_logits(model, x, InferenceConfig())
    flipped = predict_logits(model, x, InferenceConfig(flip=True))
    # a pointwise model is flip-equivariant, so the average equals the plain prediction
    assert torch.allclose(plain, flipped, atol=1e-6)


class ShapeSpy(PointwiseModel):
    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> SegOutput:
        self.shapes.append(tuple(x.shape[-2:]))
        return super().forward(x)


def test_scale_runs_the_model_on_the_resized_image_and_returns_input_size():
    model = ShapeSpy()
    x = torch.randn(2, 3, 10, 14)
    out = predict_logits(model, x, InferenceConfig(scale=2.0))
    assert model.shapes == [(20, 28)] and out.shape == (2, 4, 10, 14)
    # a constant image stays constant under resizing: the same logits at any scale
    flat = torch.ones(1, 3, 10, 14) * torch.tensor([0.3, -1.0, 2.0]).view(1, 3, 1, 1)
    assert torch.allclose(
        predict_logits(model, flat, InferenceConfig(scale=2.0)),
        predict_logits(model, flat, InferenceConfig()),
        atol=1e-5,
    )


def test_bad_scale_is_a_user_error():
    with pytest.raises(UserError, match="eval.scale"):
        InferenceConfig(scale=0.0)
