"""The bad-input catalogue: every case is a command a user could type, and each must end
with exit code 2 and one line naming the problem, never a traceback (DESIGN.md, "Errors").

Cases that read data run with ``num_workers`` 0 and 1: an error raised in a DataLoader
worker must reach the user as the same line. The commands run in-process (typer's
CliRunner) on the tiny built-in benchmark.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import write_png
from typer.testing import CliRunner

from pixcli.artifacts import load_checkpoint, save_checkpoint
from pixcli.cli import app
from pixcli.data import readers
from pixcli.engine.trainer import DIVERGED, TrainLoop
from pixcli.errors import UserError
from stages import warmup

runner = CliRunner()


@dataclasses.dataclass
class Ctx:
    """What a case builds its command from: the tiny benchmark, a warm checkpoint, a
    pseudo.h5 made from them, one made from another benchmark, and a scratch folder."""

    bench: Path
    warm: Path
    pseudo: Path
    other_pseudo: Path
    tmp: Path

    def out(self) -> str:
        return str(self.tmp / "out")


def _cli(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def _pseudolabel(bench: Path, ckpt: Path, out: Path) -> Path:
    result = _cli(
        "pseudolabel", "--checkpoint", ckpt, "--target", f"cityscapes:{bench / 'target'}",
        "--out", out, "--device", "cpu", "--set", "num_workers=0",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out / "pseudo.h5"


@pytest.fixture(scope="module")
def ctx_base(tiny_bench: Path, warm: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from tiny import TINY_BENCHMARK

    from pixcli.data.benchmark import make_benchmark

    root = tmp_path_factory.mktemp("bad_inputs")
    other = root / "other_bench"  # the same file names, other pictures (another seed)
    make_benchmark(other, dataclasses.replace(TINY_BENCHMARK, seed=TINY_BENCHMARK.seed + 1))
    return {
        "bench": tiny_bench,
        "warm": warm,
        "pseudo": _pseudolabel(tiny_bench, warm, root / "pseudo"),
        "other_pseudo": _pseudolabel(other, warm, root / "other_pseudo"),
    }


@pytest.fixture
def ctx(ctx_base: dict, tmp_path: Path) -> Ctx:
    return Ctx(**ctx_base, tmp=tmp_path)


# ----------------------------------------------------------------------------- builders


def warmup_args(c: Ctx, *extra: str, workers: int = 0, source: str | None = None) -> list[str]:
    return [
        "warmup", "--source", source or f"gta5:{c.bench / 'source'}", "--out", c.out(),
        "--device", "cpu", "--iterations", "1", "--batch-size", "2", "--backbone", "test_resnet",
        "--set", "augment.crop_size=[16, 16]", "--set", "model.feature_dim=8",
        "--set", f"num_workers={workers}", *extra,
    ]  # fmt: skip


def adapt_args(c: Ctx, *extra: str, pseudo: Path | None = None, out: str | None = None) -> list:
    """``adapt --method cpsl`` with the good pseudo.h5 (or ``pseudo``; ``c.tmp / "-"``: none)."""
    chosen = pseudo or c.pseudo
    return [
        "adapt", "--method", "cpsl", "--checkpoint", c.warm, "--source",
        f"gta5:{c.bench / 'source'}", "--target", f"cityscapes:{c.bench / 'target'}",
        *(["--pseudo", chosen] if chosen.name != "-" else []), "--out", out or c.out(),
        "--device", "cpu", "--iterations", "1", "--batch-size", "2",
        "--set", "augment.crop_size=[16, 16]", "--set", "num_workers=0", *extra,
    ]  # fmt: skip


def eval_args(c: Ctx, ckpt: Path) -> list:
    data = f"cityscapes:{c.bench / 'target'}"
    return ["eval", "--checkpoint", ckpt, "--data", data, "--out", c.out(), "--device", "cpu"]


def folder_source(c: Ctx, problem: str) -> str:
    """A folder dataset of four 16x16 images with one bad file (``problem``)."""
    root = c.tmp / "folder"
    for k in range(4):
        write_png(root / "images" / "train" / f"im{k}.png", np.full((16, 16, 3), 40 * k))
        write_png(root / "labels" / "train" / f"im{k}.png", np.full((16, 16), k))
    (root / "classes.txt").write_text("".join(f"class{k}\n" for k in range(4)))
    bad_label = root / "labels" / "train" / "im2.png"
    if problem == "label id":
        write_png(bad_label, np.full((16, 16), 9))
    elif problem == "size":
        write_png(bad_label, np.zeros((8, 16)))
    elif problem == "truncated":
        image = root / "images" / "train" / "im2.png"
        image.write_bytes(image.read_bytes()[:60])
    return f"folder:{root}"


def checkpoint_variant(c: Ctx, change: str) -> Path:
    """The warm checkpoint, spoilt in one way."""
    path = c.tmp / f"{change}.pt"
    if change == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4000))
    elif change == "truncated":
        path.write_bytes(c.warm.read_bytes()[:3000])
    elif change == "pickle payload":
        torch.save({"x": _Payload()}, path)
    elif change == "foreign dict":
        torch.save({"weights": torch.zeros(2)}, path)
    elif change == "directory":
        path.mkdir()
    else:
        ckpt = load_checkpoint(c.warm)
        if change == "nan weights":
            name = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
            ckpt["state_dict"][name] = torch.full_like(ckpt["state_dict"][name], float("nan"))
        elif change == "class count":
            ckpt["classes"] = ckpt["classes"][:-1]
        save_checkpoint(path, {k: v for k, v in ckpt.items() if k not in ("format", "version")})
    return path


class _Payload:
    def __reduce__(self):  # a checkpoint that would run code if loaded unsafely
        return (os.system, ("echo pwned",))


def damaged_pseudo(c: Ctx, how: str) -> Path:
    """A copy of the good pseudo.h5 with bytes flipped in ``how`` (a dataset or the header)."""
    path = c.tmp / "damaged.h5"
    path.write_bytes(c.pseudo.read_bytes())
    if how == "header":
        with h5py.File(path, "r+") as fh:
            fh.attrs["output_stride"] = int(fh.attrs["output_stride"]) + 1
        return path
    with h5py.File(path, "r") as fh:
        info = fh[how].id.get_chunk_info(0)
        offset, size = info.byte_offset, info.size
    data = bytearray(path.read_bytes())
    for k in range(offset, offset + min(size, 16)):
        data[k] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def foreign_out(c: Ctx) -> str:
    out = c.tmp / "out"
    out.mkdir()
    (out / "model.pt").write_bytes(b"someone else's model")
    return str(out)


def symlinked_log(c: Ctx) -> str:
    out = c.tmp / "out"
    out.mkdir()
    (c.tmp / "elsewhere.jsonl").write_text("")
    (out / "train_log.jsonl").symlink_to(c.tmp / "elsewhere.jsonl")
    return str(out)


def own_input_folder(c: Ctx) -> list:
    run = c.tmp / "run"
    run.mkdir()
    ckpt = run / "model.pt"
    ckpt.write_bytes(c.warm.read_bytes())
    args = adapt_args(c, out=str(run))
    args[args.index("--checkpoint") + 1] = ckpt
    return args


def config_file(c: Ctx, text: str) -> str:
    path = c.tmp / "config.toml"
    path.write_text(text)
    return str(path)


# ----------------------------------------------------------------------------- the table

Build = Callable[[Ctx], list]
CASES: list[tuple[str, Build, str]] = [
    # settings out of range: one line naming the setting (issue 21, items 5 and 10)
    ("batch size 0", lambda c: warmup_args(c, "--batch-size", "0"), "'batch_size' must be"),
    ("crop 0x0", lambda c: warmup_args(c, "--set", "augment.crop_size=[0, 0]"), "crop_size"),
    ("lr -1", lambda c: warmup_args(c, "--set", "optim.lr=-1"), "'optim.lr' must be"),
    ("lr nan", lambda c: warmup_args(c, "--set", "optim.lr=nan"), "'optim.lr' must be a fin"),
    ("lr inf", lambda c: warmup_args(c, "--lr", "inf"), "'optim.lr' must be a finite"),
    ("optimiser", lambda c: warmup_args(c, "--set", "optim.name=bogus"), "'optim.name' must"),
    ("iterations -5", lambda c: warmup_args(c, "--iterations", "-5"), "iterations"),
    ("workers -1", lambda c: warmup_args(c, "--set", "num_workers=-1"), "'num_workers' must"),
    ("momentum", lambda c: warmup_args(c, "--set", "optim.momentum=1.5"), "'optim.momentum'"),
    ("fraction 0", lambda c: warmup_args(c, "--labeled-fraction", "0"), "labeled_fraction"),
    ("log_every 0", lambda c: warmup_args(c, "--set", "loop.log_every=0"), "'loop.log_every'"),
    ("seed -1", lambda c: warmup_args(c, "--seed", "-1"), "'seed' must be 0 or more"),
    (
        "colour share 1.5",
        lambda c: adapt_args(c, "--set", "self_training.target_colour_stats=1.5"),
        "'self_training.target_colour_stats' must be",
    ),
    (
        "pseudo weighting",
        lambda c: adapt_args(c, "--set", "self_training.pseudo_weighting=soft"),
        "self_training.pseudo_weighting 'soft': expected one of image, pixel",
    ),
    (
        "ignore_below 1.5",
        lambda c: [
            "pseudolabel",
            "--checkpoint",
            c.warm,
            "--target",
            f"cityscapes:{c.bench / 'target'}",
            "--out",
            c.out(),
            "--set",
            "ignore_below=1.5",
        ],  # fmt: skip
        "'ignore_below' must be",
    ),
    # settings that were already refused
    ("unknown key", lambda c: warmup_args(c, "--set", "optim.lrr=1"), "unknown setting"),
    ("ill-typed", lambda c: warmup_args(c, "--set", "loop.log_every=two"), "must be int"),
    ("lr text", lambda c: warmup_args(c, "--set", "optim.lr=fast"), "'optim.lr' must be a num"),
    ("config missing", lambda c: warmup_args(c, "--config", "/no/x.toml"), "config file not"),
    ("config bad", lambda c: warmup_args(c, "--config", config_file(c, "[x")), "not valid TOML"),
    # checkpoints (items 4 and 12)
    ("random bytes", lambda c: eval_args(c, checkpoint_variant(c, "random bytes")), "refused"),
    ("pickle", lambda c: eval_args(c, checkpoint_variant(c, "pickle payload")), "refused unread"),
    ("cut ckpt", lambda c: eval_args(c, checkpoint_variant(c, "truncated")), "not a readable"),
    ("foreign", lambda c: eval_args(c, checkpoint_variant(c, "foreign dict")), "not a pixcli"),
    ("ckpt dir", lambda c: eval_args(c, checkpoint_variant(c, "directory")), "is a directory"),
    ("ckpt missing", lambda c: eval_args(c, c.tmp / "none.pt"), "none.pt: file not found"),
    ("nan weights", lambda c: eval_args(c, checkpoint_variant(c, "nan weights")), "NaN or inf"),
    ("classes", lambda c: eval_args(c, checkpoint_variant(c, "class count")), "inconsistent"),
    # --out (items 7, 8, 9)
    ("foreign out", lambda c: warmup_args(c) + ["--out", foreign_out(c)], "no pixcli"),
    ("own input", own_input_folder, "is the folder of the input"),
    ("symlink", lambda c: warmup_args(c) + ["--out", symlinked_log(c)], "symbolic link"),
    ("out is file", lambda c: warmup_args(c) + ["--out", str(c.warm)], "not a directory"),
    # datasets
    ("kind", lambda c: warmup_args(c, source="nope:/x"), "KIND one of gta5"),
    ("no dir", lambda c: warmup_args(c, source="gta5:/does/not/exist"), "/does/not/exist"),
    ("no source", lambda c: ["warmup", "--device", "cpu"], "--source is required"),
    ("eval no data", lambda c: ["eval", "--checkpoint", c.warm, "--data", ""], "--data is"),
    # pseudo.h5 (items 1 and 2)
    ("other data", lambda c: adapt_args(c, pseudo=c.other_pseudo), "made from target data"),
    ("prototypes", lambda c: adapt_args(c, pseudo=damaged_pseudo(c, "prototypes")), "damaged"),
    (
        "distribution",
        lambda c: adapt_args(c, pseudo=damaged_pseudo(c, "class_distribution")),
        "damaged",
    ),  # fmt: skip
    ("header", lambda c: adapt_args(c, pseudo=damaged_pseudo(c, "header")), "checksum"),
    ("show damaged", lambda c: ["show", damaged_pseudo(c, "prototypes")], "damaged"),
    ("show header", lambda c: ["show", damaged_pseudo(c, "header")], "checksum"),
    ("pseudo missing", lambda c: adapt_args(c, pseudo=c.tmp / "no.h5"), "file not found"),
    ("pseudo dir", lambda c: adapt_args(c, pseudo=c.tmp), "is a directory"),
    ("no pseudo", lambda c: adapt_args(c, pseudo=c.tmp / "-"), "needs --pseudo"),
    ("method", lambda c: adapt_args(c, "--method", "bogus"), "--method bogus"),
    ("show missing", lambda c: ["show", c.tmp / "none.pt"], "not found"),
]
# data errors, raised where the data is read: in the main process and in a worker (item 11)
DATA_CASES: list[tuple[str, str, str]] = [
    ("label id", "label id", "outside the 4 classes"),
    ("size", "size", "label is 16x8 but image"),
    ("truncated", "truncated", "cannot read image"),
]


def _check_one_line(result, fragment: str) -> None:
    assert result.exit_code == 2, result.output
    assert fragment in result.output, result.output
    assert "Traceback" not in result.output
    assert "weights_only" not in result.output  # never the advice to load unsafely
    assert len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.parametrize(("build", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(ctx: Ctx, build: Build, fragment: str):
    _check_one_line(_cli(*build(ctx)), fragment)


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize(
    ("problem", "fragment"), [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES]
)
def test_data_error_is_one_line_with_any_worker_count(
    ctx: Ctx, problem: str, fragment: str, workers: int
):
    source = folder_source(ctx, problem)
    _check_one_line(_cli(*warmup_args(ctx, workers=workers, source=source)), fragment)


def test_the_catalogue_has_at_least_40_cases():
    assert len(CASES) + 2 * len(DATA_CASES) >= 40


def test_a_failed_run_leaves_no_out_and_a_foreign_one_untouched(ctx: Ctx):
    result = _cli(*eval_args(ctx, checkpoint_variant(ctx, "nan weights")))
    assert result.exit_code == 2 and not (ctx.tmp / "out").exists()
    out = Path(foreign_out(ctx))
    assert _cli(*warmup_args(ctx), "--out", out).exit_code == 2
    assert sorted(p.name for p in out.iterdir()) == ["model.pt"]
    assert (out / "model.pt").read_bytes() == b"someone else's model"


def test_pseudo_labels_of_another_checkpoint_get_a_warning(ctx: Ctx, tmp_path: Path):
    other = checkpoint_variant(ctx, "copy")  # the same weights, another file fingerprint
    ckpt = load_checkpoint(other)
    ckpt["step"] = 99
    save_checkpoint(other, {k: v for k, v in ckpt.items() if k not in ("format", "version")})
    args = adapt_args(ctx)
    args[args.index("--checkpoint") + 1] = other
    result = _cli(*args)
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "was made by checkpoint" in result.output


def test_gta5_ids_outside_the_table_are_ignored_with_a_warning(tmp_path: Path, capsys):
    for sub, value in (("images", np.zeros((4, 4, 3))), ("labels", None)):
        path = tmp_path / sub / "a.png"
        if value is None:
            ids = np.full((4, 4), 7)
            ids[0, :2] = 40  # 2 of 16 pixels: 12.5 %
            write_png(path, ids, palette=True)
        else:
            write_png(path, value)
    readers._warned_label_dirs.clear()
    label = readers.open_dataset(f"gta5:{tmp_path}").read_label(0)
    assert label is not None and (label[0, :2] == 255).all() and (label[1:] == 0).all()
    err = capsys.readouterr().err
    assert "12.5% of pixels have label ids outside" in err and "e.g. 40" in err


# ----------------------------------------------------------------------------- NaN stops


def _nan_at(step: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the loss NaN from training step ``step`` (1-based) on."""
    original = TrainLoop._check_finite

    def check(self: TrainLoop, logs: dict) -> None:
        if self.step + 1 >= step:
            logs = {**logs, "loss_ce": float("nan")}
        original(self, logs)

    monkeypatch.setattr(TrainLoop, "_check_finite", check)


def test_nan_stop_names_a_finite_checkpoint_and_a_lower_lr_resumes(
    tiny_bench: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from tiny import tiny_warmup

    cfg = tiny_warmup(tiny_bench, val=None)
    cfg.loop.iterations, cfg.loop.checkpoint_every = 4, 2
    _nan_at(4, monkeypatch)
    with pytest.raises(UserError, match=r"step 4: rerun .*optim.lr.*last.pt \(step 2\)"):
        warmup.run(cfg, tmp_path)
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["step"] == 2 and (tmp_path / DIVERGED).is_file()
    assert all(
        torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point()
    )
    monkeypatch.undo()
    lower = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=cfg.optim.lr / 10))
    manifest = warmup.run(lower, tmp_path)
    assert manifest["results"]["iterations"] == 4 and not (tmp_path / DIVERGED).exists()
    assert manifest["config"]["optim"]["lr"] == pytest.approx(cfg.optim.lr / 10)


def test_nan_before_any_checkpoint_says_so_and_non_finite_weights_are_never_saved(
    tiny_bench: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from tiny import tiny_warmup

    cfg = tiny_warmup(tiny_bench, val=None)
    _nan_at(1, monkeypatch)
    with pytest.raises(UserError, match="no checkpoint was written yet"):
        warmup.run(cfg, tmp_path / "a")
    assert not (tmp_path / "a" / "last.pt").exists()
    monkeypatch.undo()

    def poison(self: TrainLoop) -> None:  # BatchNorm statistics gone infinite, loss finite
        buffers = dict(self.modules["model"].named_buffers())
        next(v for k, v in buffers.items() if k.endswith("running_var")).fill_(float("inf"))

    original = TrainLoop._save_last
    monkeypatch.setattr(TrainLoop, "_save_last", lambda self: (poison(self), original(self)))
    with pytest.raises(UserError, match=r"running_var became NaN or infinite by step 2"):
        warmup.run(cfg, tmp_path / "b")
    assert not (tmp_path / "b" / "last.pt").exists()
