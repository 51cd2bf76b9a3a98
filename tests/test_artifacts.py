import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixcli.artifacts import (
    atomic_write,
    check_classes,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
    save_label_png,
)
from pixcli.errors import UserError


def _ckpt() -> dict:
    return {
        "model_config": {"backbone": "x"},
        "classes": ["a", "b"],
        "state_dict": {"w": torch.arange(3.0)},
        "step": 7,
    }


def test_checkpoint_round_trip(tmp_path: Path):
    save_checkpoint(tmp_path / "m.pt", _ckpt())
    back = load_checkpoint(tmp_path / "m.pt")
    assert back["step"] == 7 and back["classes"] == ["a", "b"]
    assert torch.equal(back["state_dict"]["w"], torch.arange(3.0))


def test_checkpoint_that_would_run_code_is_refused(tmp_path: Path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": "pixcli-checkpoint", "evil": Evil()}, tmp_path / "e.pt")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "e.pt")


@pytest.mark.parametrize("content", [b"", b"garbage" * 10])
def test_truncated_or_foreign_file(tmp_path: Path, content: bytes):
    (tmp_path / "bad.pt").write_bytes(content)
    with pytest.raises(UserError, match="bad.pt"):
        load_checkpoint(tmp_path / "bad.pt")


def test_truncated_checkpoint(tmp_path: Path):
    save_checkpoint(tmp_path / "m.pt", _ckpt())
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "m.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "m.pt")


def test_not_a_pixcli_checkpoint(tmp_path: Path):
    torch.save({"state_dict": {}}, tmp_path / "x.pt")
    with pytest.raises(UserError, match="not a pixcli checkpoint"):
        load_checkpoint(tmp_path / "x.pt")
    with pytest.raises(UserError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_class_mismatch(tmp_path: Path):
    with pytest.raises(UserError, match="predicts 2 classes"):
        check_classes(tmp_path / "m.pt", _ckpt(), ["a", "b", "c"])
    check_classes(tmp_path / "m.pt", _ckpt(), ("a", "b"))


def test_atomic_write_fsyncs_only_when_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    synced: list[int] = []
    monkeypatch.setattr(os, "fsync", synced.append)
    atomic_write(tmp_path / "a.txt", lambda tmp: tmp.write_text("a"))
    assert len(synced) == 2  # the file, then its directory (the rename)
    atomic_write(tmp_path / "b.txt", lambda tmp: tmp.write_text("b"), durable=False)
    assert len(synced) == 2 and (tmp_path / "b.txt").read_text() == "b"


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def failing(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_temporaries_of_a_killed_writer_are_removed_and_live_ones_kept(tmp_path: Path):
    """Also when the killed process started after this one (a rerun inside the same Python
    process, as the tests and ``pixcli demo`` do): the file names its writer."""
    out = tmp_path / "out"
    out.mkdir()
    marker = tmp_path / "writing"

    def write_then_hang(path: Path) -> None:
        path.write_text("half")
        marker.write_text("writing")
        time.sleep(60)

    pid = os.fork()
    if pid == 0:  # the writer, SIGKILLed in the middle of its write
        try:
            atomic_write(out / "last.pt", write_then_hang)
        finally:
            os._exit(1)
    try:
        deadline = time.monotonic() + 60
        while not marker.is_file() and time.monotonic() < deadline:
            time.sleep(0.01)
        (tmp,) = out.glob(".last.pt.*.tmp")
        assert remove_stale_temporaries(out) == []  # its writer is alive
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert remove_stale_temporaries(out) == [tmp]
    assert list(out.iterdir()) == []

    def write_while_cleaning(path: Path) -> None:
        path.write_text("new")
        assert remove_stale_temporaries(out) == []  # this process's write in progress

    atomic_write(out / "m.json", write_while_cleaning)
    assert [p.name for p in out.iterdir()] == ["m.json"]


def test_label_png_is_exact_and_coloured(tmp_path: Path):
    label = np.array([[0, 1], [255, 1]], dtype=np.uint8)
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[1] = (10, 20, 30)
    save_label_png(tmp_path / "p.png", label, palette)
    img = Image.open(tmp_path / "p.png")
    assert img.mode == "P"
    assert np.array_equal(np.asarray(img), label)
    assert np.asarray(img.convert("RGB"))[0, 1].tolist() == [10, 20, 30]
