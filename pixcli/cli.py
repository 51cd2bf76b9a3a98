"""The ``pixcli`` command line: one thin command per stage.

Each command parses its options into the stage's configuration (defaults < ``--config
FILE.toml`` < ``--set KEY=VALUE`` < named options) and calls ``stages.<stage>.run``.
Exit codes: 0 success, 2 user error (one line on stderr), 130 interrupted (Ctrl-C), 143
terminated (SIGTERM; work saved as for Ctrl-C), 1 a bug.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from pixcli.config import load_config, parse_set_options
from pixcli.engine.progress import console
from pixcli.errors import Interrupted, UserError, exit_code, sigterm_as_interrupt

app = typer.Typer(
    help="pixcli: domain-adaptive and label-efficient semantic segmentation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

F = TypeVar("F", bound=Callable[..., Any])

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="TOML file with settings (see examples/).")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Any setting as KEY=VALUE, e.g. --set optim.lr=0.01 (repeatable)."),
]
OutOpt = Annotated[Path, typer.Option("--out", help="Output directory.")]
IterationsOpt = Annotated[int | None, typer.Option(help="Training iterations.")]
LrOpt = Annotated[float | None, typer.Option(help="Backbone learning rate.")]
ValOpt = Annotated[str | None, typer.Option(help="Labelled validation data, KIND:PATH.")]
WindowOpt = Annotated[
    str | None,
    typer.Option(
        help="Sliding window HxW, e.g. 512x1024 (default: the checkpoint's; else whole image)."
    ),
]
StrideOpt = Annotated[str | None, typer.Option(help="Window stride HxW.")]
FlipOpt = Annotated[bool | None, typer.Option("--flip", help="Average with flipped input.")]
LabeledFractionOpt = Annotated[
    float | None,
    typer.Option(help="Labelled share (seeded split): semi of --target, otherwise of --source."),
]
LabeledListOpt = Annotated[
    Path | None, typer.Option(help="File of labelled image names (labelled.txt of a run).")
]
ForceOpt = Annotated[
    bool,
    typer.Option("--force", help="Delete this stage's earlier run in --out and start over."),
]
CompileOpt = Annotated[
    bool | None,
    typer.Option("--compile", help="torch.compile the trained model (slow to start; for GPUs)."),
]
ModelOpt = Annotated[Path, typer.Option("--checkpoint", help="A pixcli model.pt.")]
ScaleOpt = Annotated[
    float | None, typer.Option(help="Resize images by this before inference (default: 1).")
]


def _print_version(value: bool) -> None:
    if value:
        from pixcli import __version__

        typer.echo(f"pixcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    """pixcli: domain-adaptive and label-efficient semantic segmentation."""


def user_errors(fn: F) -> F:
    """Turn a UserError into one line on stderr and exit code 2; Ctrl-C into exit 130,
    SIGTERM into 143 (see :func:`pixcli.errors.sigterm_as_interrupt`)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except (Interrupted, KeyboardInterrupt) as exc:
            console.print(f"[yellow]{exc or 'interrupted'}[/]", highlight=False)
            raise typer.Exit(exit_code(exc)) from None

    return wrapper  # type: ignore[return-value]


def _start_over(force: bool, out: Path, stage: str) -> None:
    """``--force``: clear ``out`` of ``stage``'s earlier run (see stages.common.start_over)."""
    if force:
        from stages.common import start_over

        start_over(out, stage)


def _overrides(sets: list[str] | None, named: dict[str, Any]) -> dict[str, Any]:
    return {**parse_set_options(sets or []), **{k: v for k, v in named.items() if v is not None}}


@app.command("make-benchmark")
@user_errors
def make_benchmark(
    out: Annotated[Path, typer.Argument(help="Directory to write the benchmark into.")],
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same files).")] = 0,
    size: Annotated[
        str | None, typer.Option(help="Image size WxH, e.g. 256x128 (default: the demo's).")
    ] = None,
    n_source: Annotated[int | None, typer.Option(help="Source images.")] = None,
    n_target_train: Annotated[int | None, typer.Option(help="Target train images.")] = None,
    n_target_val: Annotated[int | None, typer.Option(help="Target val images.")] = None,
    style: Annotated[
        str | None,
        typer.Option(
            help="street (the default: synthetic -> real), dusk (pastel -> hazy dusk) or varied"
            " (the target draws one of five scene types per image: the semi benchmark)."
        ),
    ] = None,
) -> None:
    """Draw the built-in synthetic-to-real street-scene benchmark.

    Example: pixcli make-benchmark runs/bench --seed 0
    """
    from stages import make_benchmark as stage

    stage.run(out, seed, size, n_source, n_target_train, n_target_val, style=style)


@app.command()
@user_errors
def warmup(
    source: Annotated[str | None, typer.Option(help="Labelled data, KIND:PATH.")] = None,
    out: OutOpt = Path("runs/warmup"),
    val: ValOpt = None,
    target: Annotated[
        str | None, typer.Option(help="Unlabelled target data for --adversarial, KIND:PATH.")
    ] = None,
    adversarial: Annotated[
        bool | None,
        typer.Option("--adversarial", help="Output-space adversarial warm-up (AdaptSegNet)."),
    ] = None,
    labeled_fraction: LabeledFractionOpt = None,
    labeled_list: LabeledListOpt = None,
    iterations: IterationsOpt = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per batch.")] = None,
    lr: LrOpt = None,
    backbone: Annotated[str | None, typer.Option(help="Any timm model name.")] = None,
    head: Annotated[
        str | None, typer.Option(help="Decode head: deeplabv2, deeplabv3plus or daformer.")
    ] = None,
    pretrained: Annotated[
        bool | None, typer.Option("--pretrained", help="Start from timm's ImageNet weights.")
    ] = None,
    weights_file: Annotated[
        Path | None, typer.Option(help="Start the backbone from a local weights file.")
    ] = None,
    compile_: CompileOpt = None,
    force: ForceOpt = False,
    config: ConfigOpt = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = None,
    set_: SetOpt = None,
) -> None:
    """Train on labelled data (source-only, or a target oracle); resumable.

    Example: pixcli warmup --source gta5:runs/bench/source --val cityscapes:runs/bench/target
    --out runs/warmup --config examples/demo.toml
    """
    from stages import warmup as stage

    named = {
        "source": source, "val": val, "target": target, "adversarial.enabled": adversarial,
        "labeled_fraction": labeled_fraction,
        "labeled_list": str(labeled_list) if labeled_list else None,
        "loop.iterations": iterations, "batch_size": batch_size, "optim.lr": lr,
        "model.backbone": backbone, "model.head": head, "model.pretrained": pretrained,
        "model.weights_file": str(weights_file) if weights_file else None,
        "compile": compile_, "device": device, "seed": seed,
    }  # fmt: skip
    cfg = load_config(stage.WarmupConfig, config, _overrides(set_, named))
    _start_over(force, out, "warmup")
    stage.run(cfg, out)


@app.command()
@user_errors
def adapt(
    checkpoint: Annotated[Path, typer.Option(help="The warmed-up model.pt to start from.")],
    method: Annotated[
        str | None, typer.Option(help="none, cpsl, pgpc, pixl, ipixmatch, distill.")
    ] = None,
    source: Annotated[str | None, typer.Option(help="Labelled source data, KIND:PATH.")] = None,
    target: Annotated[str | None, typer.Option(help="Target data, KIND:PATH.")] = None,
    pseudo: Annotated[Path | None, typer.Option(help="pseudo.h5 from pixcli pseudolabel.")] = None,
    val: ValOpt = None,
    setting: Annotated[str | None, typer.Option(help="uda, semi or supervised.")] = None,
    labeled_fraction: LabeledFractionOpt = None,
    labeled_list: LabeledListOpt = None,
    out: OutOpt = Path("runs/adapt"),
    iterations: IterationsOpt = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per batch and stream.")] = None,
    lr: LrOpt = None,
    compile_: CompileOpt = None,
    force: ForceOpt = False,
    config: ConfigOpt = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = None,
    set_: SetOpt = None,
) -> None:
    """Self-training from a warmed-up model with a method plugged in; resumable.

    Bare defaults are each method's paper recipe for GPUs: none, pgpc and pixl DAFormer's
    (AdamW 6e-5, heads x10, weight decay 0.01, 1,500 warm-up iterations, EMA 0.999 with
    DAFormer's ramp, rare-class sampling; 40k/60k/60k iterations), cpsl CPSL's (SGD 1e-4,
    weight decay 2e-4, EMA 0.999 constant). examples/demo_adapt.toml is the CPU recipe.

    Example: pixcli adapt --method none --checkpoint runs/warmup/model.pt
    --source gta5:runs/bench/source --target cityscapes:runs/bench/target
    --val cityscapes:runs/bench/target --out runs/adapt-none
    """
    from stages import adapt as stage

    named = {
        "method": method, "source": source, "target": target,
        "pseudo": str(pseudo) if pseudo else None, "val": val, "setting": setting,
        "labeled_fraction": labeled_fraction,
        "labeled_list": str(labeled_list) if labeled_list else None,
        "loop.iterations": iterations, "batch_size": batch_size, "optim.lr": lr,
        "compile": compile_, "device": device, "seed": seed,
    }  # fmt: skip
    cfg = stage.load_adapt_config(config, _overrides(set_, named))
    _start_over(force, out, "adapt")
    stage.run(cfg, checkpoint, out)


@app.command()
@user_errors
def distill(
    teacher: Annotated[Path, typer.Option(help="The adapted model.pt: round 1's teacher.")],
    source: Annotated[str | None, typer.Option(help="Labelled source data, KIND:PATH.")] = None,
    target: Annotated[
        str | None, typer.Option(help="Target images, KIND:PATH (labels not trained on).")
    ] = None,
    val: ValOpt = None,
    rounds: Annotated[int | None, typer.Option(help="Distillation rounds (default: 2).")] = None,
    student_init: Annotated[
        str | None,
        typer.Option(
            help="The student: pretrained (timm), scratch, teacher (each round's teacher), "
            "weights:FILE (backbone) or checkpoint:FILE (default: pretrained)."
        ),
    ] = None,
    threshold: Annotated[
        float | None, typer.Option(help="Ignore pseudo labels below this confidence (0.95).")
    ] = None,
    out: OutOpt = Path("runs/distill"),
    iterations: Annotated[int | None, typer.Option(help="Training iterations per round.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per batch and stream.")] = None,
    lr: LrOpt = None,
    compile_: CompileOpt = None,
    force: ForceOpt = False,
    config: ConfigOpt = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = None,
    set_: SetOpt = None,
) -> None:
    """Self-distillation rounds into a fresh student (CPSL+distill, ProDA); resumable.

    Example: pixcli distill --teacher runs/adapt-cpsl/model.pt --source
    gta5:runs/bench/source --target cityscapes:runs/bench/target --val
    cityscapes:runs/bench/target --rounds 2 --out runs/distill
    """
    from stages import distill as stage

    named = {
        "source": source, "target": target, "val": val, "rounds": rounds,
        "student_init": student_init, "distill.threshold": threshold,
        "loop.iterations": iterations, "batch_size": batch_size, "optim.lr": lr,
        "compile": compile_, "device": device, "seed": seed,
    }  # fmt: skip
    cfg = load_config(stage.DistillConfig, config, _overrides(set_, named))
    _start_over(force, out, "distill")
    stage.run(cfg, teacher, out)


@app.command("eval")
@user_errors
def eval_(
    checkpoint: Annotated[Path, typer.Option(help="A pixcli model.pt.")],
    data: Annotated[str, typer.Option(help="Labelled data, KIND:PATH.")],
    out: OutOpt = Path("runs/eval"),
    split: Annotated[str | None, typer.Option(help="Split to evaluate.")] = None,
    window: WindowOpt = None,
    stride: StrideOpt = None,
    flip: FlipOpt = None,
    scale: ScaleOpt = None,
    save_predictions: Annotated[
        bool | None, typer.Option("--save-predictions", help="Write palette PNGs.")
    ] = None,
    force: ForceOpt = False,
    config: ConfigOpt = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = None,
    set_: SetOpt = None,
) -> None:
    """Per-class IoU, mIoU, accuracies and the confusion matrix into metrics.json.

    Inference as predict's: the checkpoint's own settings unless an option replaces one.

    Example: pixcli eval --checkpoint runs/warmup/model.pt --data cityscapes:runs/bench/target
    --out runs/eval
    """
    from stages import eval as stage

    named = {
        "data": data, "split": split, "eval.window": _hw(window, "--window"),
        "eval.stride": _hw(stride, "--stride"), "eval.flip": flip, "eval.scale": scale,
        "save_predictions": save_predictions, "device": device, "seed": seed,
    }  # fmt: skip
    cfg = load_config(stage.EvalConfig, config, _overrides(set_, named))
    _start_over(force, out, "eval")
    stage.run(cfg, checkpoint, out)


@app.command("embed-report")
@user_errors
def embed_report(
    checkpoint: Annotated[
        list[Path], typer.Option(help="A pixcli model.pt; repeat it to compare models.")
    ],
    data: Annotated[str, typer.Option(help="Images, KIND:PATH (labels used when present).")],
    out: OutOpt = Path("runs/embed-report"),
    split: Annotated[str | None, typer.Option(help="Split to sample (default: val).")] = None,
    per_class: Annotated[
        int | None, typer.Option(help="Pixels sampled per class (default: 500).")
    ] = None,
    force: ForceOpt = False,
    config: ConfigOpt = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = None,
    set_: SetOpt = None,
) -> None:
    """t-SNE pictures, Calinski-Harabasz, Davies-Bouldin and silhouette of pixel features.

    Example: pixcli embed-report --checkpoint runs/warmup/model.pt --checkpoint
    runs/adapt/model.pt --data cityscapes:runs/bench/target --out runs/embed-report
    """
    from stages import embed_report as stage

    named = {"data": data, "split": split, "per_class": per_class, "device": device, "seed": seed}
    cfg = load_config(stage.EmbedReportConfig, config, _overrides(set_, named))
    _start_over(force, out, "embed-report")
    stage.run(cfg, checkpoint, out)


@app.command()
@user_errors
def pseudolabel(
    checkpoint: Annotated[Path, typer.Option(help="A warmed-up pixcli model.pt.")],
    target: Annotated[str, typer.Option(help="Target images, KIND:PATH (labels optional).")],
    out: OutOpt = Path("runs/pseudo"),
    split: Annotated[str | None, typer.Option(help="Split to label (default: train).")] = None,
    output_stride: Annotated[
        int | None, typer.Option(help="Stride of the stored label grid (default: the model's).")
    ] = None,
    window: WindowOpt = None,
    stride: StrideOpt = None,
    flip: FlipOpt = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per forward pass.")] = None,
    force: ForceOpt = False,
    config: ConfigOpt = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = None,
    set_: SetOpt = None,
) -> None:
    """Soft pseudo labels, prototypes and class distribution into OUT/pseudo.h5; resumable.

    Inference as eval's and predict's: the checkpoint's own settings unless an option replaces one.

    Example: pixcli pseudolabel --checkpoint runs/warmup/model.pt --target
    cityscapes:runs/bench/target --out runs/pseudo
    """
    from stages import pseudolabel as stage

    named = {
        "target": target, "split": split, "output_stride": output_stride,
        "inference.window": _hw(window, "--window"), "inference.stride": _hw(stride, "--stride"),
        "inference.flip": flip, "batch_size": batch_size, "device": device, "seed": seed,
    }  # fmt: skip
    cfg = load_config(stage.PseudolabelConfig, config, _overrides(set_, named))
    _start_over(force, out, "pseudolabel")
    stage.run(cfg, checkpoint, out)


@app.command()
@user_errors
def predict(
    checkpoint: ModelOpt,
    images: Annotated[
        list[str] | None,
        typer.Option(help="Image files, directories (recursive) or glob patterns (repeatable)."),
    ] = None,
    more_images: Annotated[
        list[str] | None, typer.Argument(help="More images (e.g. a shell-expanded glob).")
    ] = None,
    out: OutOpt = Path("runs/predict"),
    window: WindowOpt = None,
    stride: StrideOpt = None,
    flip: FlipOpt = None,
    scale: ScaleOpt = None,
    alpha: Annotated[
        float | None, typer.Option(help="Weight of the class colours in *_overlay.jpg (0.5).")
    ] = None,
    confidence: Annotated[
        bool | None, typer.Option("--confidence", help="Also write *_confidence.png.")
    ] = None,
    probs: Annotated[
        bool | None,
        typer.Option("--probs", help="Also write *_probs.npy (C x H x W float16)."),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Images of equal size per forward pass (default: 1).")
    ] = None,
    config: ConfigOpt = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = None,
    set_: SetOpt = None,
) -> None:
    """Label, colour and overlay images for any images; reruns skip finished images.

    Example: pixcli predict --checkpoint runs/adapt-cpsl/model.pt --images photos/
    --out runs/predict
    """
    from stages import predict as stage

    named = {
        "images": [*(images or []), *(more_images or [])] or None,
        "eval.window": _hw(window, "--window"), "eval.stride": _hw(stride, "--stride"),
        "eval.flip": flip, "eval.scale": scale, "alpha": alpha, "confidence": confidence,
        "probs": probs, "batch_size": batch_size, "device": device, "seed": seed,
    }  # fmt: skip
    cfg = load_config(stage.PredictConfig, config, _overrides(set_, named))
    stage.run(cfg, checkpoint, out)


@app.command()
@user_errors
def export(
    checkpoint: ModelOpt,
    out: Annotated[Path, typer.Option("--out", help="File to write, e.g. model.onnx.")],
    format_: Annotated[str | None, typer.Option("--format", help="onnx or torchscript.")] = None,
    height: Annotated[int | None, typer.Option(help="Example input height (512).")] = None,
    width: Annotated[int | None, typer.Option(help="Example input width (1024).")] = None,
    dynamic: Annotated[
        bool | None, typer.Option("--dynamic", help="Free batch size, height and width.")
    ] = None,
    config: ConfigOpt = None,
    seed: SeedOpt = None,
    set_: SetOpt = None,
) -> None:
    """Export to ONNX or TorchScript: normalised N x 3 x H x W in, logits at H x W out.

    Example: pixcli export --checkpoint runs/adapt-cpsl/model.pt --format onnx --dynamic
    --out runs/model.onnx
    """
    from stages import export as stage

    named = {
        "format": format_, "height": height, "width": width, "dynamic": dynamic, "seed": seed,
    }  # fmt: skip
    cfg = load_config(stage.ExportConfig, config, _overrides(set_, named))
    stage.run(cfg, checkpoint, out)


@app.command()
@user_errors
def show(
    path: Annotated[
        Path, typer.Argument(help="A checkpoint, manifest, metrics, pseudo.h5 or train_log.jsonl.")
    ],
) -> None:
    """Print a summary of any pixcli artifact."""
    from stages import show as stage

    stage.run(path)


RunsArg = Annotated[
    list[Path], typer.Argument(help="Run directories (warmup, adapt, distill or eval outputs).")
]


@app.command()
@user_errors
def plot(
    runs: RunsArg,
    out: Annotated[Path, typer.Option("--out", help="The PNG to write.")] = Path("curves.png"),
) -> None:
    """Loss, learning-rate and mIoU curves of one or several runs on shared axes.

    Example: pixcli plot runs/adapt-none runs/adapt-cpsl --out curves.png
    """
    from stages import plot as stage

    stage.run(runs, out)


@app.command()
@user_errors
def report(
    runs: RunsArg,
    out: Annotated[Path, typer.Option("--out", help="The HTML file to write.")] = Path(
        "report.html"
    ),
    data: Annotated[
        str | None,
        typer.Option(help="Images for the prediction grid, KIND:PATH (default: the evals' data)."),
    ] = None,
    split: Annotated[str, typer.Option(help="Split of --data.")] = "val",
    images: Annotated[int, typer.Option(help="Images in the prediction grid.")] = 4,
    device: DeviceOpt = "auto",
) -> None:
    """One self-contained HTML page: eval metrics table, curves, input | GT | predictions.

    Example: pixcli report runs/demo/eval-warmup runs/demo/eval-cpsl --out report.html
    """
    from stages import report as stage

    stage.run(runs, out, data, split, images, device)


@app.command()
@user_errors
def demo(
    out: OutOpt = Path("runs/demo"),
    config: ConfigOpt = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = None,
    set_: SetOpt = None,
) -> None:
    """Run every stage on the built-in benchmark and print target-val mIoU per model.

    Example: pixcli demo --out runs/demo
    """
    from stages import demo as stage

    cfg = load_config(stage.DemoConfig, config, _overrides(set_, {"device": device, "seed": seed}))
    stage.run(cfg, out)


def _hw(text: str | None, option: str) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"{option} {text!r}: expected HxW, e.g. 512x1024") from None
    if h <= 0 or w <= 0:
        raise UserError(f"{option} {text!r}: sizes must be positive")
    return h, w


def main() -> None:
    sigterm_as_interrupt()  # SIGTERM (e.g. SLURM preemption) saves work like Ctrl-C
    app(prog_name="pixcli")


if __name__ == "__main__":
    sys.exit(main())
