"""Every method on a built-in benchmark over seeds: mean +- std mIoU, the share of the
source-to-oracle gap, per-class IoU, against the plain reference (issue 17).

    python benchmarks/methods_quality.py --seeds 3                          # street, seed 0
    python benchmarks/methods_quality.py --seeds 3 --style dusk --bench-seed 1
    python benchmarks/methods_quality.py --seeds 3 --methods none,cpsl --jobs 2
    python benchmarks/methods_quality.py --seeds 3 --methods none,flip \
        --variant flip:none:self_training.teacher_flip=true     # a recipe change against none
    python benchmarks/methods_quality.py --seeds 3 --methods none,cpsl \
        --distill-variant colour:self_training.target_colour_stats=1.0  # row cpsl+distill-colour
    python benchmarks/methods_quality.py --quick                            # tiny: it runs

Each run is an ordinary ``pixcli`` command (the example recipes ``examples/demo.toml``,
``examples/demo_adapt.toml``, ``examples/demo_distill.toml``) writing into ``--work``, so an
interrupted study resumes and a finished one only prints its table. The warm-up
(source-only), the oracle (target labels) and the pseudo labels are made once (seed 0);
per seed: ``adapt --method M`` for every method from that warm-up, one distillation round of
the cpsl model, and ``benchmarks/plain_reference.py`` (its own source-only, oracle and
self-training) at the same iterations and batch. Seeds vary the adaptation, not the
warm-up it starts from, so that the methods are compared from the same model. ``--jobs``
runs that many commands at once with ``--threads`` threads each. The gap share of a model is
``(mIoU - warm-up) / (oracle - warm-up)`` of its own seed (the plain reference's: its own
source-only and oracle).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
PIXCLI = [sys.executable, "-m", "pixcli"]


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="training seeds 0..N-1")
    p.add_argument("--style", default="street", help="make-benchmark --style")
    p.add_argument("--bench-seed", type=int, default=0, help="make-benchmark --seed")
    p.add_argument("--methods", default="none,cpsl,pgpc,pixl", help="methods or variants")
    p.add_argument("--variant", action="append", default=[],
                   help="NAME:METHOD:key=value,key=value, a model of --methods: the method "
                        "with these --set on top of the recipe")  # fmt: skip
    p.add_argument("--distill-variant", action="append", default=[],
                   help="NAME:key=value,key=value, one more distillation round of the cpsl "
                        "model with these --set (the row cpsl+distill-NAME)")  # fmt: skip
    p.add_argument("--no-distill", action="store_true", help="skip the distillation round")
    p.add_argument("--no-plain", action="store_true", help="skip the plain reference runs")
    p.add_argument("--table-only", action="store_true", help="print what --work holds; run nothing")
    p.add_argument("--warmup-iterations", type=int, default=None, help="default: the recipe's")
    p.add_argument("--adapt-iterations", type=int, default=None, help="default: the recipe's")
    p.add_argument("--jobs", type=int, default=2, help="chains run at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per chain")
    p.add_argument("--work", type=Path, default=None, help="default: runs/quality-STYLE-SEED")
    p.add_argument("--quick", action="store_true", help="tiny benchmark and budgets")
    p.add_argument("--json", action="store_true", help="also print the table as JSON")
    return p.parse_args()


def parse_variants(specs: list[str]) -> dict[str, tuple[str, list[str]]]:
    """``NAME:METHOD:k=v,k=v`` -> {NAME: (METHOD, ["--set", "k=v", ...])}."""
    out = {}
    for spec in specs:
        name, method, *rest = spec.split(":", 2)
        out[name] = (method, set_options(rest[0] if rest else ""))
    return out


def parse_distill_variants(specs: list[str]) -> dict[str, list[str]]:
    """``NAME:k=v,k=v`` -> {NAME: ["--set", "k=v", ...]}."""
    out = {}
    for spec in specs:
        name, _, sets = spec.partition(":")
        if not name or not sets:
            raise SystemExit(f"--distill-variant {spec!r}: expected NAME:key=value,...")
        out[name] = set_options(sets)
    return out


def set_options(pairs: str) -> list[str]:
    """``k=v,k=v`` -> ``["--set", "k=v", "--set", "k=v"]``."""
    return [s for kv in pairs.split(",") if kv for s in ("--set", kv)]


def recipe_iterations(toml: Path) -> int:
    import tomllib

    return int(tomllib.loads(toml.read_text())["loop"]["iterations"])


class Study:
    """The commands of one study and their outputs."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.work = a.work or ROOT / "runs" / f"quality-{a.style}-{a.bench_seed}"
        self.bench = self.work / "benchmark"
        self.source = f"gta5:{self.bench / 'source'}"
        self.target = f"cityscapes:{self.bench / 'target'}"
        self.methods = [m for m in a.methods.split(",") if m]
        self.variants = parse_variants(getattr(a, "variant", []))
        self.distill_variants = parse_distill_variants(getattr(a, "distill_variant", []))
        self.warm_it = a.warmup_iterations or recipe_iterations(EXAMPLES / "demo.toml")
        self.adapt_it = a.adapt_iterations or recipe_iterations(EXAMPLES / "demo_adapt.toml")
        self.env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
        self.common = ["--set", "num_workers=0"]

    def run(self, cmd: list[str], log: Path) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as fh:
            done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=self.env)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}); see {log}")

    def seed_dir(self, seed: int) -> Path:
        return self.work / f"seed{seed}"

    def evaluate(self, model: Path, out: Path) -> None:
        if not (out / "metrics.json").is_file():
            cmd = [*PIXCLI, "eval", "--checkpoint", str(model), "--data", self.target]
            self.run([*cmd, "--out", str(out)], out.with_suffix(".log"))

    def warmup(self, seed: int, name: str, data: str, extra: tuple[str, ...] = ()) -> Path:
        out = self.seed_dir(seed) / name
        cmd = [*PIXCLI, "warmup", "--config", str(EXAMPLES / "demo.toml"), "--source", data,
               "--out", str(out), "--seed", str(seed)]  # fmt: skip
        cmd += ["--iterations", str(self.warm_it), *extra]
        self.run([*cmd, *self.common], out.with_suffix(".log"))
        self.evaluate(out / "model.pt", self.seed_dir(seed) / f"eval-{name}")
        return out / "model.pt"

    def method_of(self, name: str) -> tuple[str, list[str]]:
        """A model of ``--methods``: its method and the ``--set`` options of its variant."""
        return self.variants.get(name, (name, []))

    def adapt(self, seed: int, name: str, warm: Path, pseudo: Path | None) -> Path:
        out = self.seed_dir(seed) / f"adapt-{name}"
        method, sets = self.method_of(name)
        cmd = [*PIXCLI, "adapt", "--config", str(EXAMPLES / "demo_adapt.toml"), "--method",
               method, "--checkpoint", str(warm), "--source", self.source, "--target",
               self.target, "--out", str(out), "--seed", str(seed), "--iterations",
               str(self.adapt_it)]  # fmt: skip
        if method == "cpsl" and pseudo is not None:
            cmd += ["--pseudo", str(pseudo)]
        self.run([*cmd, *sets, *self.common], out.with_suffix(".log"))
        self.evaluate(out / "model.pt", self.seed_dir(seed) / f"eval-{name}")
        return out / "model.pt"

    def pseudolabel(self, warm: Path) -> Path:
        out = self.work / "pseudo"
        cmd = [*PIXCLI, "pseudolabel", "--checkpoint", str(warm), "--target", self.target]
        self.run([*cmd, "--out", str(out)], out.with_suffix(".log"))
        return out / "pseudo.h5"

    def method(self, seed: int, method: str, warm: Path, pseudo: Path | None) -> None:
        """``adapt --method`` from the warm-up; for cpsl also its distillation round."""
        model = self.adapt(seed, method, warm, pseudo)
        if method == "cpsl" and not self.a.no_distill:
            self.distill(seed, model, "", [])
            for name, sets in self.distill_variants.items():
                self.distill(seed, model, f"-{name}", sets)

    def distill(self, seed: int, teacher: Path, suffix: str, sets: list[str]) -> None:
        """One distillation round of ``teacher``, evaluated as ``cpsl+distill{suffix}``."""
        out = self.seed_dir(seed) / f"distill-cpsl{suffix}"
        cmd = [*PIXCLI, "distill", "--config", str(EXAMPLES / "demo_distill.toml"),
               "--teacher", str(teacher), "--source", self.source, "--target",
               self.target, "--out", str(out), "--seed", str(seed), "--iterations",
               str(self.adapt_it)]  # fmt: skip
        self.run([*cmd, *sets, *self.common], out.with_suffix(".log"))
        self.evaluate(out / "model.pt", self.seed_dir(seed) / f"eval-cpsl+distill{suffix}")

    def plain(self, seed: int) -> None:
        out = self.seed_dir(seed) / "plain.json"
        if out.is_file():
            return
        cmd = [sys.executable, str(ROOT / "benchmarks" / "plain_reference.py"), "--source",
               self.source, "--target", self.target, "--iterations", str(self.warm_it),
               "--adapt-iterations", str(self.adapt_it), "--seed", str(seed), "--threads",
               str(self.a.threads), "--out", str(out)]  # fmt: skip
        self.run(cmd, out.with_suffix(".log"))

    def prepare(self) -> None:
        if not (self.bench / "benchmark.json").is_file() or not json.loads(
            (self.bench / "benchmark.json").read_text()
        ).get("complete"):
            cmd = [*PIXCLI, "make-benchmark", str(self.bench), "--seed", str(self.a.bench_seed),
                   "--style", self.a.style]  # fmt: skip
            if self.a.quick:
                cmd += ["--n-source", "24", "--n-target-train", "16", "--n-target-val", "8"]
            self.run(cmd, self.work / "make-benchmark.log")

    def all_runs(self) -> None:
        """Phase 1: warm-up and oracle (seed 0, shared by every seed's adaptation), the
        pseudo labels; phase 2: every (seed, method) and the plain reference per seed."""
        with ThreadPoolExecutor(self.a.jobs) as pool:
            warm_job = pool.submit(self.warmup, 0, "warmup", self.source)
            # the oracle, an upper bound, without the warm-up's colour jitter (a domain-gap
            # augmentation: 250 iterations with it gave 51.2 against 62.4 without)
            no_jitter = ("--set", "augment.color_jitter=0")
            oracle_job = pool.submit(self.warmup, 0, "oracle", self.target, no_jitter)
            seeds = [] if self.a.no_plain else range(self.a.seeds)
            plain_jobs = [pool.submit(self.plain, seed) for seed in seeds]
            warm = warm_job.result()
            cpsl = any(self.method_of(m)[0] == "cpsl" for m in self.methods)
            pseudo = self.pseudolabel(warm) if cpsl else None
            jobs = [
                pool.submit(self.method, seed, m, warm, pseudo)
                for seed in range(self.a.seeds)
                for m in self.methods
            ]
            for job in [oracle_job, *plain_jobs, *jobs]:
                job.result()


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.1f} ± {std:.1f}"


def trained_models(study: Study) -> list[str]:
    """The table's rows that each seed trains: the methods, then the distillation rounds."""
    names = [*study.methods]
    if "cpsl" in study.methods and not study.a.no_distill:
        names += ["cpsl+distill", *(f"cpsl+distill-{n}" for n in study.distill_variants)]
    return names


def collect(study: Study) -> tuple[list[str], list[list[str]], dict]:
    """The table: model, seeds run, mIoU mean +- std, gap share, per-class mean IoU."""
    names = ["warmup", *trained_models(study), "oracle"]
    per: dict[str, list[dict]] = {n: [] for n in [*names, "plain source-only", "plain oracle",
                                                  "plain self-training"]}  # fmt: skip
    classes: list[str] = []
    for seed in range(study.a.seeds):
        d = study.seed_dir(seed)
        for n in names:
            if n in ("warmup", "oracle") and seed > 0:  # made once, seed 0
                continue
            path = d / f"eval-{n}" / "metrics.json"
            if not path.is_file():  # not run (yet): the row shows the seeds that were
                continue
            m = json.loads(path.read_text())
            classes = list(m["per_class"])
            per[n].append({"mIoU": m["mIoU"], "iou": [m["per_class"][c]["IoU"] for c in classes],
                           "seed": seed})  # fmt: skip
        if not (d / "plain.json").is_file():
            continue
        plain = json.loads((d / "plain.json").read_text())
        for key, n in (("source_only", "plain source-only"), ("oracle", "plain oracle"),
                       ("self_training", "plain self-training")):  # fmt: skip
            per[n].append({"mIoU": plain[key][0], "iou": plain[key][1], "seed": seed})
    present = [i for i, c in enumerate(classes)
               if any(per[n] and per[n][0]["iou"][i] is not None for n in names)]  # fmt: skip
    for runs in (per[n] for n in names):
        for r in runs:
            r["iou"] = [r["iou"][i] for i in present]
    classes = [classes[i] for i in present]
    ids = _class_ids(classes)
    rows, raw = [], {}
    for n, runs in per.items():
        if not runs:
            continue
        low, high = ("plain source-only", "plain oracle") if n.startswith("plain") else (
            "warmup", "oracle")  # fmt: skip
        shares = [100 * (r["mIoU"] - lo) / (hi - lo) for r in runs
                  if (lo := _of(per[low], r["seed"])) is not None
                  and (hi := _of(per[high], r["seed"])) is not None]  # fmt: skip
        miou = [r["mIoU"] for r in runs]
        iou = [[_value(r["iou"], n, i, ids) for r in runs] for i in range(len(classes))]
        cls = [f"{statistics.fmean(v):.1f}" if v and not any(map(math.isnan, v)) else "-"
               for v in iou]  # fmt: skip
        rows.append([n, str(len(runs)), mean_std(miou), mean_std(shares), *cls])
        per_class = dict(zip(classes, iou, strict=True))
        raw[n] = {"mIoU": miou, "gap_share": shares, "per_class": per_class}
    return ["model", "seeds", "mIoU", "gap %", *classes], rows, raw


LABEL_KEYS = ("pl_mIoU", "pl_teacher_mIoU", "pl_confident")


def run_dir(study: Study, seed: int, name: str) -> Path:
    """Where the training run of a table row lives: adapt-NAME, or distill-cpsl[-X]."""
    d = study.seed_dir(seed)
    if name.startswith("cpsl+distill"):
        return d / f"distill-cpsl{name.removeprefix('cpsl+distill')}"
    return d / f"adapt-{name}"


def last_label_worth(run: Path) -> dict[str, float]:
    """The pseudo-label figures (:data:`LABEL_KEYS`) of a run's last logged step; a
    distillation's from its last round. Empty when the run logged none."""
    logs = sorted(run.glob("**/train_log.jsonl")) if run.is_dir() else []
    out: dict[str, float] = {}
    if not logs:
        return out
    for line in logs[-1].read_text().splitlines():
        entry = json.loads(line)
        found = {k: entry[k] for k in LABEL_KEYS if isinstance(entry.get(k), int | float)}
        out.update({k: float(v) for k, v in found.items()})
    return out


def label_rows(study: Study) -> list[list[str]]:
    """Per model, mean +- std over seeds of what its pseudo labels were worth at the end:
    the labels the student trained on, the teacher's own (where the method changed them),
    and the teacher's confident share."""
    rows = []
    for n in trained_models(study):
        runs = [last_label_worth(run_dir(study, s, n)) for s in range(study.a.seeds)]
        runs = [r for r in runs if r]
        if runs:
            cells = [mean_std([r[k] for r in runs if k in r]) for k in LABEL_KEYS]
            rows.append([n, str(len(runs)), *cells])
    return rows


def _of(runs: list[dict], seed: int) -> float | None:
    """The mIoU of ``seed``'s run in ``runs`` (the warm-up and oracle: their one run)."""
    for r in runs:
        if r["seed"] == seed or len(runs) == 1:
            return r["mIoU"]
    return None


def _class_ids(classes: list[str]) -> list[int]:
    from pixcli.data.taxonomy import CITYSCAPES_CLASSES

    return [CITYSCAPES_CLASSES.index(c) for c in classes]


def _value(iou: list, name: str, i: int, ids: list[int]) -> float:
    """Class ``i`` of the table from a run's list: pixcli lists the table's classes, the
    plain reference all 19 train ids."""
    v = iou[ids[i]] if name.startswith("plain") else iou[i]
    return float("nan") if v is None else float(v)


def main() -> None:
    a = arguments()
    if a.quick:
        a.seeds = min(a.seeds, 2)
        a.warmup_iterations = a.warmup_iterations or 2
        a.adapt_iterations = a.adapt_iterations or 2
    study = Study(a)
    if not a.table_only:
        study.prepare()
        study.all_runs()
    columns, rows, raw = collect(study)
    title = (f"methods on the {a.style} benchmark (seed {a.bench_seed}), {a.seeds} seeds, "
             f"warm-up {study.warm_it} / adaptation {study.adapt_it} iterations")  # fmt: skip
    # a Markdown table (too wide for a terminal table; the README takes it as it is)
    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    text = title + "\n\n" + "\n".join(md) + "\n"
    labels = label_rows(study)
    if labels:  # the target has labels (every built-in benchmark): what the labels were worth
        head = ["model", "seeds", "labels' mIoU", "teacher's labels' mIoU", "confident %"]
        text += ("\nThe pseudo labels on the target train images at each run's last logged "
                 "step (train_log.jsonl):\n\n| " + " | ".join(head) + " |\n|"
                 + "---|" * len(head) + "\n")  # fmt: skip
        text += "".join("| " + " | ".join(r) + " |\n" for r in labels)
    print(text)
    (study.work / "quality.md").write_text(text)
    (study.work / "quality.json").write_text(json.dumps(raw, indent=1))
    if a.json:
        print(json.dumps({"title": title, "columns": columns, "rows": rows}))


if __name__ == "__main__":
    main()
