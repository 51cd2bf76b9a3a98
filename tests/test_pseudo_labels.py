"""pseudo.h5: quantization, prototype maths, writer/reader, merging, damaged files."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pixcli.engine.metrics import ConfidenceBins
from pixcli.engine.prototypes import PrototypeAccumulator, class_feature_sums, hard_labels
from pixcli.errors import UserError
from pixcli.pseudo_labels import (
    Header,
    ImageRecord,
    PseudoLabelFile,
    PseudoLabelWriter,
    crop_resized,
    dequantize_probs,
    image_stats,
    merge,
    open_h5,
    quantize_probs,
    quantize_unit,
    summary,
)

C, D, STRIDE = 5, 3, 4
# image sizes (H, W); their grids at stride 4 are 4x6, 4x6, 4x6 and 3x3
SIZES = np.array([[16, 24], [13, 24], [16, 24], [9, 10]], dtype=np.int32)


def _header(**changes: object) -> Header:
    header = Header(
        classes=tuple(f"class{c}" for c in range(C)),
        names=tuple(f"img{i}" for i in range(len(SIZES))),
        output_stride=STRIDE,
        feature_dim=D,
        checkpoint="ckpt-a",
        dataset="folder:/data",
        split="train",
        dataset_fingerprint="data-a",
        settings=Header.settings_json({"flip": False}),
    )
    return dataclasses.replace(header, **changes)  # type: ignore[arg-type]


def _record(i: int) -> ImageRecord:
    """A deterministic record for image ``i`` on its grid."""
    h, w = -(-SIZES[i] // STRIDE)
    gen = torch.Generator().manual_seed(i)
    probs = torch.randn(C, h, w, generator=gen).mul(3).softmax(0)
    features = torch.randn(D, h, w, generator=gen)
    hard, confidence = hard_labels(probs, ignore_below=0.3)
    sums, counts = class_feature_sums(features, hard, C)
    return ImageRecord(probs, hard, confidence, sums, counts)


def _write(path: Path, indices: range | list[int], header: Header | None = None) -> None:
    """Write images ``indices`` into the work file ``path`` (created if needed)."""
    writer = PseudoLabelWriter.open(path, header or _header(), lambda: SIZES)
    with writer:
        for i in indices:
            writer.write(i, _record(i))


def _finish(work_files: list[Path], final: Path) -> Path:
    acc = PrototypeAccumulator(C, D)
    for sums, counts in image_stats(work_files):
        acc.add(sums, counts)
    merge(work_files, final, _header(), acc.prototypes(), acc.counts, acc.class_distribution())
    return final


def _complete_file(tmp_path: Path) -> Path:
    _write(tmp_path / "work.h5", range(len(SIZES)))
    return _finish([tmp_path / "work.h5"], tmp_path / "pseudo.h5")


def contents(path: Path) -> dict[str, np.ndarray]:
    """Every dataset and attribute of an HDF5 file."""
    with h5py.File(path, "r") as fh:
        data = {f"@{k}": v for k, v in fh.attrs.items()}
        fh.visititems(lambda n, o: data.update({n: o[()]}) if isinstance(o, h5py.Dataset) else None)
    return data


def assert_same_content(a: Path, b: Path) -> None:
    """Same datasets and attributes, value for value (the bytes of the file may differ)."""
    left, right = contents(a), contents(b)
    assert left.keys() == right.keys()
    for key, value in left.items():
        assert np.array_equal(value, right[key]), key


# ------------------------------------------------------------------------- quantization


@pytest.mark.parametrize("num_classes", [2, 19, 60])
@pytest.mark.parametrize("temperature", [0.1, 1.0, 10.0])
def test_quantization_round_trip_error_below_1_over_255(num_classes: int, temperature: float):
    gen = torch.Generator().manual_seed(num_classes)
    probs = (torch.randn(num_classes, 40, 50, generator=gen) * temperature).softmax(0)
    q = quantize_probs(probs)
    assert q.dtype == torch.uint8 and (q.sum(0, dtype=torch.int64) == 255).all()
    back = dequantize_probs(q.numpy())
    assert np.abs(back - probs.numpy()).max() < 1 / 255
    np.testing.assert_allclose(back.sum(0), 1.0, atol=1e-6)


def test_quantization_of_exact_values_and_padding():
    onehot = F.one_hot(torch.tensor([[0, 2], [1, 1]]), 3).permute(2, 0, 1).float()
    assert (quantize_probs(onehot) == onehot.to(torch.uint8) * 255).all()
    thirds = torch.full((3, 1, 1), 1 / 3)
    assert quantize_probs(thirds).flatten().tolist() == [85, 85, 85]
    assert dequantize_probs(np.zeros((3, 2, 2), np.uint8)).sum() == 0  # padding stays zero
    assert quantize_unit(torch.tensor([0.0, 0.5, 1.0])).tolist() == [0, 128, 255]


# ------------------------------------------------------------------------- prototype maths


def test_prototypes_and_distribution_equal_a_hand_computation():
    # image 1: 2x2 grid, D=2; image 2: 1x2 grid. 255 = ignored.
    f1 = torch.tensor([[[3.0, 0.0], [1.0, 2.0]], [[4.0, 5.0], [0.0, 0.0]]])
    l1 = torch.tensor([[0, 1], [0, 255]], dtype=torch.uint8)
    f2 = torch.tensor([[[0.0, 6.0]], [[2.0, 8.0]]])
    l2 = torch.tensor([[1, 1]], dtype=torch.uint8)
    acc = PrototypeAccumulator(3, 2)
    for f, lab in ((f1, l1), (f2, l2)):
        acc.add(*class_feature_sums(f, lab, 3))
    # normalised pixel features: (3,4)/5, (0,5)/5, (1,0), [ignored], (0,2)/2, (6,8)/10
    class0 = (np.array([0.6, 0.8]) + np.array([1.0, 0.0])) / 2
    class1 = (np.array([0.0, 1.0]) + np.array([0.0, 1.0]) + np.array([0.6, 0.8])) / 3
    expected = np.stack([class0, class1, np.zeros(2)])
    np.testing.assert_allclose(acc.prototypes().numpy(), expected, rtol=1e-6)
    assert acc.counts.tolist() == [2, 3, 0]
    np.testing.assert_allclose(acc.class_distribution().numpy(), [0.4, 0.6, 0.0])
    raw, _ = class_feature_sums(f1, l1, 3, normalize=False)
    np.testing.assert_allclose(raw[0].numpy(), [4.0, 4.0])


def test_hard_labels_ignore_low_confidence():
    probs = torch.tensor([[[0.9, 0.4]], [[0.1, 0.35]], [[0.0, 0.25]]])
    labels, conf = hard_labels(probs, ignore_below=0.5)
    assert labels.tolist() == [[0, 255]] and conf[0].tolist() == pytest.approx([0.9, 0.4])


def test_confidence_bins_count_accuracy_per_bin():
    bins = ConfidenceBins(edges=(0.0, 0.5, 0.9, 1.0))
    pred = torch.tensor([0, 1, 1, 2, 2, 0])
    conf = torch.tensor([0.2, 0.6, 0.95, 1.0, 0.5, 0.3])
    label = torch.tensor([0, 0, 1, 2, 255, 1])
    bins.process(pred, conf, label)
    rows = bins.evaluate()
    assert [r["pixels"] for r in rows] == [2, 1, 2]
    assert [r["accuracy"] for r in rows] == [50.0, 0.0, 100.0]
    assert rows[1]["kept_share"] == pytest.approx(60.0) and rows[1]["kept_accuracy"] == 200 / 3


# ------------------------------------------------------------------------- resizing


@pytest.mark.parametrize(
    ("size", "top", "left", "crop", "flip"),
    [((16, 24), 0, 0, (16, 24), False), ((37, 50), 5, 9, (20, 30), True),
     ((7, 9), 2, 3, (8, 8), False), ((30, 17), 10, 0, (25, 17), True)],
)  # fmt: skip
def test_crop_resized_equals_resize_then_crop(size, top, left, crop, flip):
    maps = torch.rand(3, 4, 6)
    full = F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]
    padded = torch.zeros(3, max(size[0], top + crop[0]), max(size[1], left + crop[1]))
    padded[:, : size[0], : size[1]] = full
    expected = padded[:, top : top + crop[0], left : left + crop[1]]
    expected = expected.flip(-1) if flip else expected
    got = crop_resized(maps, size, top, left, crop, flip)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------- writer / reader


def test_reader_returns_what_was_written(tmp_path: Path):
    path = _complete_file(tmp_path)
    labels = PseudoLabelFile(path)
    assert len(labels) == 4 and labels.index("img3") == 3 and labels.output_stride == STRIDE
    for i in range(4):
        rec = _record(i)
        soft = labels.soft(i)
        assert soft.shape == tuple(rec.probs.shape)
        assert np.abs(soft - rec.probs.numpy()).max() < 1 / 255
        np.testing.assert_allclose(soft.sum(0), 1.0, atol=1e-6)
        assert np.array_equal(labels.hard(i), rec.hard.numpy())
        assert np.abs(labels.confidence(i) - rec.confidence.numpy()).max() <= 1 / 510 + 1e-7
        crop = labels.soft_crop(i, (20, 30), top=4, left=2, crop=(8, 8))
        torch.testing.assert_close(crop.sum(0), torch.ones(8, 8))
    assert labels.soft_resized(3).shape == (C, 9, 10)
    acc = PrototypeAccumulator(C, D)
    for i in range(4):
        acc.add(_record(i).feature_sums, _record(i).class_counts)
    np.testing.assert_allclose(labels.prototypes, acc.prototypes().numpy(), atol=1e-6)  # f32 sums
    np.testing.assert_allclose(labels.class_distribution, acc.class_distribution().numpy())
    assert np.array_equal(labels.class_counts_per_image.sum(0), labels.class_counts)
    worker_copy = pickle.loads(pickle.dumps(labels))  # as a DataLoader worker gets it
    assert np.array_equal(worker_copy.hard(1), labels.hard(1))
    with pytest.raises(UserError, match="no pseudo labels for image 'nope'"):
        labels.index("nope")


def test_work_file_is_refused_by_the_reader(tmp_path: Path):
    _write(tmp_path / "work.h5", [0, 2])
    with pytest.raises(UserError, match=r"unfinished work file .*\(2 of 4 images written\)"):
        PseudoLabelFile(tmp_path / "work.h5")
    assert summary(tmp_path / "work.h5")["complete"] == "no, a work file: 2 of 4 images written"


def test_resumed_writing_equals_one_pass(tmp_path: Path):
    clean = _complete_file(tmp_path)
    _write(tmp_path / "resumed.h5", [0, 1])
    assert PseudoLabelWriter(tmp_path / "resumed.h5", _header()).done.tolist() == [1, 1, 0, 0]
    _write(tmp_path / "resumed.h5", [2, 3])
    resumed = _finish([tmp_path / "resumed.h5"], tmp_path / "pseudo2.h5")
    assert_same_content(clean, resumed)


def test_done_image_without_its_chunks_is_redone(tmp_path: Path):
    _write(tmp_path / "work.h5", [0])
    with h5py.File(tmp_path / "work.h5", "r+") as fh:
        fh["done"][1] = 1  # marked done, but its data never reached the disk
    assert PseudoLabelWriter(tmp_path / "work.h5", _header()).done.tolist() == [1, 0, 0, 0]


@pytest.mark.parametrize(
    ("change", "message"),
    [({"checkpoint": "ckpt-b"}, "made with checkpoint ckpt-a, this run has ckpt-b"),
     ({"dataset_fingerprint": "data-b"}, "target images with fingerprint data-a"),
     ({"output_stride": 8}, "output stride 4, this run has 8"),
     ({"settings": Header.settings_json({"flip": True})}, "made with settings")],
)  # fmt: skip
def test_work_file_made_from_other_inputs_is_refused(tmp_path: Path, change: dict, message: str):
    _write(tmp_path / "work.h5", [0])
    with pytest.raises(UserError, match=f"{message}.*refusing to add"):
        PseudoLabelWriter.open(tmp_path / "work.h5", _header(**change), lambda: SIZES)


def test_work_files_of_several_processes_merge_into_the_same_file(tmp_path: Path):
    one = _complete_file(tmp_path)
    _write(tmp_path / "w0.h5", [0, 2])
    _write(tmp_path / "w1.h5", [1, 3])
    merged = _finish([tmp_path / "w0.h5", tmp_path / "w1.h5"], tmp_path / "merged.h5")
    assert_same_content(one, merged)
    with pytest.raises(RuntimeError, match="1 images are in no work file"):
        _write(tmp_path / "w2.h5", [0, 1, 2])
        _finish([tmp_path / "w2.h5"], tmp_path / "never.h5")
    assert not (tmp_path / "never.h5").exists()


# ------------------------------------------------------------------------- damaged files


def test_truncated_files_are_a_clear_error(tmp_path: Path):
    path = _complete_file(tmp_path)
    for cut in (path, tmp_path / "work.h5"):
        data = cut.read_bytes()
        cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a readable HDF5 file, truncated or damaged"):
        PseudoLabelFile(path)
    with pytest.raises(UserError, match="not a readable HDF5 file, truncated or damaged"):
        PseudoLabelWriter(tmp_path / "work.h5", _header())


def test_damaged_chunk_is_a_clear_error(tmp_path: Path):
    path = _complete_file(tmp_path)
    with h5py.File(path, "r") as fh:
        info = fh["soft"].id.get_chunk_info_by_coord((2, 0, 0, 0))
    data = bytearray(path.read_bytes())
    data[info.byte_offset + info.size // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    labels = PseudoLabelFile(path)
    labels.soft(1)  # other images still read
    with pytest.raises(UserError, match=r"soft of image 2 \(img2\) is unreadable, the file is"):
        labels.soft(2)


def test_full_disk_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def no_space(self, key, value) -> None:
        raise OSError("Can't write data (file write failed: errno = 28, No space left on device)")

    writer = PseudoLabelWriter.open(tmp_path / "work.h5", _header(), lambda: SIZES)
    with writer:
        monkeypatch.setattr(h5py.Dataset, "__setitem__", no_space)
        with pytest.raises(UserError, match="work.h5: cannot write .*No space left on device"):
            writer.write(0, _record(0))
        monkeypatch.undo()
    assert PseudoLabelWriter(tmp_path / "work.h5", _header()).done.tolist() == [0, 0, 0, 0]


def test_foreign_files_are_refused(tmp_path: Path):
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all" * 100)
    with pytest.raises(UserError, match="not a readable HDF5 file"):
        open_h5(tmp_path / "junk.h5")
    with h5py.File(tmp_path / "other.h5", "w") as fh:
        fh["x"] = 1
    with pytest.raises(UserError, match="not a pixcli pseudo-label file"):
        PseudoLabelFile(tmp_path / "other.h5")
    with pytest.raises(UserError, match="not found"):
        PseudoLabelFile(tmp_path / "missing.h5")
