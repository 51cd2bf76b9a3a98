"""Semi-supervised training where labels are scarce (issue 22): the labelled-only / all-labelled
curve, then at the label-limited splits the UniMatch step, IPixMatch and PiXL's semi setting
against labelled-only and the upper bound, over seeds: mean +- std mIoU, the share of the
labelled-only-to-upper-bound gap closed, per-class IoU.

    python benchmarks/semi_quality.py --seeds 3                 # the README's tables
    python benchmarks/semi_quality.py --seeds 3 --splits 0.0625 --models none,ipixmatch
    python benchmarks/semi_quality.py --seeds 3 --variant ipix-a50:ipixmatch:ipixmatch.alpha=50
    python benchmarks/semi_quality.py --table-only              # print what --work holds
    python benchmarks/semi_quality.py --quick                   # tiny: it runs

The benchmark is ``pixcli make-benchmark --style varied --size 128x64`` (its target: five
scene types per image, small objects); ``--style dusk --bench-seed 1`` is the second benchmark
a recipe change is checked on. Each run is an ordinary ``pixcli`` command writing
into ``--work`` (one at a time, one thread), so an interrupted study resumes and a finished one
only prints its tables. Phase 1, the curve (seed 0): ``pixcli warmup`` on 1/30, 1/16, 1/8 of
the target's train images and on all of them (``examples/semi_varied_warmup.toml``). Phase 2,
at each split whose curve gap is >= ``--min-gap`` (or the ``--splits`` given), from that
split's warm-up (seed 0) and its ``labelled.txt``, per seed: ``adapt --setting supervised``
on the labelled images (labelled-only) and on all of them (the upper bound), and ``adapt
--setting semi`` with each model of ``--models`` (``none`` is the UniMatch step), all with
``examples/semi_varied.toml``. Seeds vary the adaptation, not the split or the warm-up. The
gap share of a model is ``(mIoU - labelled-only) / (upper bound - labelled-only)`` of its
own seed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.methods_quality import (  # noqa: E402
    EXAMPLES,
    PIXCLI,
    ROOT,
    Study,
    mean_std,
    parse_variants,
)

FRACTIONS = (0.0333, 0.0625, 0.125)  # 1/30, 1/16, 1/8 (10, 19 and 38 of 300 images)
RECIPE = EXAMPLES / "semi_varied.toml"
WARMUP_RECIPE = EXAMPLES / "semi_varied_warmup.toml"
LABELLED_ONLY, UPPER = "labelled-only", "all labelled"
# The README's rows: the methods with examples/semi_varied.toml, and variants (--set on top)
COLOUR = "self_training.target_colour_stats=1.0"
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "ipixmatch-paper": ("ipixmatch", ["--set", "ipixmatch.alpha=1"]),  # the paper's alpha
    "pixl-full-res": ("pixl", ["--set", "pixl.lr_scale=1.0"]),  # X^L not downscaled
    # the same on UniMatch's step instead of the paper's DACS step (a pixcli option)
    "pixl-unimatch": (
        "pixl",
        ["--set", "pixl.lr_scale=1.0", "--set", "self_training.consistency=unimatch"],
    ),
    # examples/semi_varied.toml recolours the labelled crops to an unlabelled image's channel
    # statistics (target_colour_stats = 1.0); "no-colour" is the UniMatch step without it, the
    # "-colour" rows name it explicitly (the README's tables of the release that measured it)
    "no-colour": ("none", ["--set", "self_training.target_colour_stats=0"]),
    "colour": ("none", ["--set", COLOUR]),
    "ipixmatch-colour": ("ipixmatch", ["--set", COLOUR]),
    "pixl-full-res-colour": ("pixl", ["--set", "pixl.lr_scale=1.0", "--set", COLOUR]),
}
MODELS = ("no-colour", "none", "ipixmatch", "ipixmatch-paper", "pixl", "pixl-full-res")


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="training seeds 0..N-1")
    p.add_argument("--bench-seed", type=int, default=0, help="make-benchmark --seed")
    p.add_argument("--style", default="varied", help="make-benchmark --style (varied: the "
                   "label-limited one; another checks a recipe on a second benchmark)")  # fmt: skip
    p.add_argument("--splits", default="", help="labelled fractions to study (default: the "
                   "curve's fractions whose gap is >= --min-gap)")  # fmt: skip
    p.add_argument("--min-gap", type=float, default=6.0, help="mIoU, all-labelled - labelled")
    p.add_argument("--models", default=",".join(MODELS), help="semi methods or variants")
    p.add_argument("--variant", action="append", default=[],
                   help="NAME:METHOD:key=value,key=value, a model of --models")  # fmt: skip
    p.add_argument("--table-only", action="store_true", help="print what --work holds; run nothing")
    p.add_argument("--warmup-iterations", type=int, default=None, help="default: the recipe's")
    p.add_argument("--adapt-iterations", type=int, default=None, help="default: the recipe's")
    p.add_argument("--work", type=Path, default=None,
                   help="default: runs/semi-quality-SEED (another style: -STYLE-SEED)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="tiny benchmark and budgets")
    p.add_argument("--json", action="store_true", help="also print the tables as JSON")
    a = p.parse_args()
    a.jobs, a.threads, a.methods = 1, 1, ""
    # another style's study in its own directory: prepare() keeps a finished benchmark
    style = "" if a.style == "varied" else f"{a.style}-"
    a.work = a.work or ROOT / "runs" / f"semi-quality-{style}{a.bench_seed}"
    return a


def split_name(fraction: float) -> str:
    """0.0333 -> "1_30", 1 -> "1_1": the name of a fraction's runs."""
    return f"1_{round(1 / fraction)}"


class SemiStudy(Study):
    """The curve's warm-ups and, per split and seed, the adaptation runs."""

    def __init__(self, a: argparse.Namespace) -> None:
        super().__init__(a)
        self.warm_it = a.warmup_iterations or _iterations(WARMUP_RECIPE)
        self.adapt_it = a.adapt_iterations or _iterations(RECIPE)
        self.models = [m for m in a.models.split(",") if m]
        self.variants = {**VARIANTS, **parse_variants(a.variant)}

    def prepare(self) -> None:
        meta = self.bench / "benchmark.json"
        if meta.is_file() and json.loads(meta.read_text()).get("complete"):
            return
        cmd = [*PIXCLI, "make-benchmark", str(self.bench), "--seed", str(self.a.bench_seed),
               "--style", self.a.style, "--size", "128x64", "--n-source", "1"]  # fmt: skip
        if self.a.quick:
            cmd += ["--n-target-train", "30", "--n-target-val", "4"]
        self.run(cmd, self.work / "make-benchmark.log")

    def curve(self) -> None:
        """``pixcli warmup`` (seed 0) on each fraction of the target and on all of it."""
        for fraction in (*FRACTIONS, 1.0):
            out = self.seed_dir(0) / f"warmup-{split_name(fraction)}"
            cmd = [*PIXCLI, "warmup", "--config", str(WARMUP_RECIPE), "--source", self.target,
                   "--labeled-fraction", str(fraction), "--iterations", str(self.warm_it),
                   "--out", str(out)]  # fmt: skip
            self.run([*cmd, *self.common], out.with_suffix(".log"))
            self.evaluate(out / "model.pt", self.seed_dir(0) / f"eval-{out.name}")

    def adapt_run(self, seed: int, split: float, name: str) -> None:
        """One adaptation from ``split``'s warm-up: ``name`` is labelled-only, all labelled, a
        method or a variant."""
        warm = self.seed_dir(0) / f"warmup-{split_name(split)}"
        tag = f"{split_name(split)}-{name.replace(' ', '-')}"
        out = self.seed_dir(seed) / tag
        method, sets = self.variants.get(name, (name, []))
        cmd = [*PIXCLI, "adapt", "--config", str(RECIPE), "--checkpoint", str(warm / "model.pt"),
               "--out", str(out), "--seed", str(seed), "--iterations",
               str(self.adapt_it)]  # fmt: skip
        if name in (LABELLED_ONLY, UPPER):
            cmd += ["--setting", "supervised", "--source", self.target]
            cmd += ["--labeled-fraction", "1"] if name == UPPER else []
        else:
            cmd += ["--method", method, "--target", self.target]
        if name != UPPER:
            cmd += ["--labeled-list", str(warm / "labelled.txt")]
        self.run([*cmd, *sets, *self.common], out.with_suffix(".log"))
        self.evaluate(out / "model.pt", self.seed_dir(seed) / f"eval-{tag}")

    def splits(self) -> list[float]:
        if self.a.splits:
            return [float(f) for f in self.a.splits.split(",")]
        curve = curve_rows(self)
        return [f for f, row in zip(FRACTIONS, curve, strict=False) if row[-1] >= self.a.min_gap]

    def all_runs(self) -> None:
        self.curve()
        for split in self.splits():
            for seed in range(self.a.seeds):
                for name in (LABELLED_ONLY, *self.models, UPPER):
                    self.adapt_run(seed, split, name)


def _iterations(toml: Path) -> int:
    import tomllib

    return int(tomllib.loads(toml.read_text())["loop"]["iterations"])


def _metrics(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def curve_rows(study: SemiStudy) -> list[list]:
    """Per fraction: labelled images, labelled-only and all-labelled mIoU, their gap."""
    full = _metrics(study.seed_dir(0) / "eval-warmup-1_1" / "metrics.json")
    rows = []
    for fraction in FRACTIONS:
        name = split_name(fraction)
        m = _metrics(study.seed_dir(0) / f"eval-warmup-{name}" / "metrics.json")
        listing = study.seed_dir(0) / f"warmup-{name}" / "labelled.txt"
        if m is None or full is None:
            break
        n = len(listing.read_text().split()) if listing.is_file() else "-"
        rows.append([name.replace("_", "/"), n, m["mIoU"], full["mIoU"], full["mIoU"] - m["mIoU"]])
    return rows


def split_table(study: SemiStudy, split: float) -> tuple[list[str], list[list[str]], dict]:
    """Model, seeds run, mIoU mean +- std, gap share, per-class mean IoU at one split."""
    names = [LABELLED_ONLY, *study.models, UPPER]
    per: dict[str, list[dict]] = {n: [] for n in names}
    classes: list[str] = []
    for seed in range(study.a.seeds):
        for n in names:
            tag = f"{split_name(split)}-{n.replace(' ', '-')}"
            m = _metrics(study.seed_dir(seed) / f"eval-{tag}" / "metrics.json")
            if m is None:  # not run (yet): the row shows the seeds that were
                continue
            classes = list(m["per_class"])
            iou = [m["per_class"][c]["IoU"] for c in classes]
            per[n].append({"seed": seed, "mIoU": m["mIoU"], "iou": iou})
    present = [i for i in range(len(classes))  # the benchmark's classes: an IoU in some run
               if any(r["iou"][i] is not None for runs in per.values() for r in runs)]  # fmt: skip
    names_present = [classes[i] for i in present]
    rows, raw = [], {}
    for n, runs in per.items():
        if not runs:
            continue
        shares = []
        for r in runs:
            lo, hi = _of(per[LABELLED_ONLY], r["seed"]), _of(per[UPPER], r["seed"])
            if lo is not None and hi is not None and hi != lo:
                shares.append(100 * (r["mIoU"] - lo) / (hi - lo))
        miou = [r["mIoU"] for r in runs]
        iou = [[_nan(r["iou"][i]) for r in runs] for i in present]
        cls = [f"{statistics.fmean(v):.1f}" if not any(map(math.isnan, v)) else "-" for v in iou]
        rows.append([n, str(len(runs)), mean_std(miou), mean_std(shares), *cls])
        raw[n] = {
            "mIoU": miou,
            "gap_share": shares,
            "per_class": dict(zip(names_present, iou, strict=True)),
        }
    return ["model", "seeds", "mIoU", "gap closed %", *names_present], rows, raw


def _of(runs: list[dict], seed: int) -> float | None:
    return next((r["mIoU"] for r in runs if r["seed"] == seed), None)


def _nan(v: float | None) -> float:
    return float("nan") if v is None else float(v)


def markdown(columns: list[str], rows: list[list]) -> str:
    fmt = [[f"{v:.1f}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(md + ["| " + " | ".join(r) + " |" for r in fmt]) + "\n"


def main() -> None:
    a = arguments()
    if a.quick:
        a.seeds, a.splits = 1, a.splits or str(FRACTIONS[0])
        a.warmup_iterations = 2
        a.adapt_iterations = a.adapt_iterations or 2
    study = SemiStudy(a)
    if not a.table_only:
        study.prepare()
        study.all_runs()
    curve = ["labelled", "images", "labelled-only mIoU", "all-labelled mIoU", "gap"]
    text = (f"labelled-only against all-labelled, the {a.style} benchmark (seed {a.bench_seed}), "
            f"warm-up {study.warm_it} iterations, seed 0\n\n")  # fmt: skip
    text += markdown(curve, curve_rows(study))
    tables = {"curve": {"columns": curve, "rows": curve_rows(study)}}
    for split in study.splits():
        columns, rows, raw = split_table(study, split)
        text += (f"\n{split_name(split).replace('_', '/')} labelled, {a.seeds} seeds, warm-up "
                 f"{study.warm_it} + adaptation {study.adapt_it} iterations\n\n")  # fmt: skip
        text += markdown(columns, rows)
        tables[split_name(split)] = {"columns": columns, "rows": rows, "raw": raw}
    print(text)
    (study.work / "semi_quality.md").write_text(text)
    (study.work / "semi_quality.json").write_text(json.dumps(tables, indent=1))
    if a.json:
        print(json.dumps(tables))


if __name__ == "__main__":
    main()
