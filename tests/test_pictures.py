"""Pictures of runs (issue 19): pixcli plot, eval's confusion.png, pixcli report, and show
on a train_log.jsonl."""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from pixcli.cli import app
from pixcli.errors import UserError
from pixcli.figures import CURVE_SIZE, confusion_size
from stages import eval as eval_stage
from stages import plot, report, show


@pytest.fixture(scope="module")
def evaluated(warm: Path, tiny_bench: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An eval run of the session's warmed-up model on the tiny target's val images."""
    out = tmp_path_factory.mktemp("pictures") / "eval-warm"
    cfg = eval_stage.EvalConfig(data=f"cityscapes:{tiny_bench / 'target'}", device="cpu")
    eval_stage.run(cfg, warm, out)
    return out


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()  # decodes every pixel: a truncated file raises here
    return image


def test_eval_writes_a_confusion_png_of_the_expected_size(evaluated: Path):
    image = _decode((evaluated / "confusion.png").read_bytes())
    assert image.format == "PNG" and image.size == confusion_size(19)
    colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 10  # cells and labels, not a blank canvas


def test_plot_draws_curves_of_several_runs(warm: Path, evaluated: Path, tmp_path: Path):
    out = tmp_path / "curves.png"
    plot.run([warm.parent, evaluated], out)  # the eval run's curves are its model's
    image = _decode(out.read_bytes())
    assert image.size == CURVE_SIZE
    runs = plot.load_runs([warm.parent, evaluated])
    assert [len(log) for _, log in runs] == [len(runs[0][1])] * 2 and runs[0][1]
    with pytest.raises(UserError, match="name it"):
        plot.run([warm.parent], tmp_path / "curves.jpg")


def test_plot_command_refuses_runs_without_logs(tmp_path: Path):
    result = CliRunner().invoke(app, ["plot", str(tmp_path), "--out", str(tmp_path / "c.png")])
    assert result.exit_code == 2 and "has a train_log.jsonl" in result.output


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.cells: list[str] = []
        self.open: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append(dict(attrs)["src"] or "")
        elif tag not in ("meta", "br"):
            self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.open and self.open[-1] == tag, f"</{tag}> closes {self.open[-1:]}"
        self.open.pop()

    def handle_data(self, data: str) -> None:
        if self.open and self.open[-1] in ("td", "th"):
            self.cells.append(data)


def test_report_is_one_html_file_whose_images_decode(warm: Path, evaluated: Path, tmp_path: Path):
    out = report.run([evaluated, warm.parent], tmp_path / "report.html", images=2, device="cpu")
    page = _Page()
    page.feed(out.read_text())
    page.close()
    assert page.open == []  # every element closed
    prefix = "data:image/png;base64,"
    assert page.images and all(src.startswith(prefix) for src in page.images)
    decoded = [_decode(base64.b64decode(src[len(prefix) :])) for src in page.images]
    assert decoded[0].size == CURVE_SIZE
    # 2 images x (input, ground truth, eval-warm's model, the warm-up run's model)
    assert len(decoded) == 1 + 2 * 4
    metrics = eval_stage.read_json(evaluated / "metrics.json")
    assert "eval-warm" in page.cells and f"{metrics['mIoU']:.1f}" in page.cells


def test_show_summarises_a_train_log(warm: Path, capsys: pytest.CaptureFixture):
    show.run(warm.parent / "train_log.jsonl")
    text = capsys.readouterr().out
    assert "loss_ce" in text and "val mIoU (best)" in text
