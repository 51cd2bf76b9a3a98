"""Every benchmark, one table: runs the scripts of ``benchmarks/`` one after the other (each
in its own process, with ``--json``) and prints all their figures together.

    python benchmarks/run_all.py                  # all of them (tens of minutes on a CPU)
    python benchmarks/run_all.py --only cpsl,embed_report
    python benchmarks/run_all.py --paper          # warmup_eval with the paper-sized model
    python benchmarks/run_all.py --quick          # tiny sizes: checks every script runs
    make bench                                    # the same as the first line

Each row is one figure: the script, the row and column of the script's own table, the
value. The scripts' table titles (threads, models, goals) follow as notes. A script that
fails is reported with the end of its error output, the others still run, and the exit
code is 1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import last_json_line, print_rows  # noqa: E402

HERE = Path(__file__).resolve().parent
SCRIPTS = {
    "warmup_eval": HERE / "warmup_eval_bench.py",
    "pseudolabel": HERE / "pseudolabel_bench.py",
    "embed_report": HERE / "embed_report_bench.py",
    "cpsl": HERE / "cpsl_bench.py",
    "methods": HERE / "methods_bench.py",
    "predict": HERE / "predict_bench.py",
    "model_speed": HERE / "model_speed.py",
}


def run_script(script: Path, extra: list[str]) -> list[dict]:
    """The tables ``script --json *extra`` prints; a ``RuntimeError`` with the end of its
    error output when it fails."""
    cmd = [sys.executable, str(script), "--json", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"exit code {done.returncode}: {done.stderr.strip()[-1500:]}")
    try:
        return last_json_line(done.stdout)["tables"]
    except (ValueError, KeyError, IndexError) as exc:
        raise RuntimeError(f"no JSON line of tables at the end of its output ({exc})") from None


def figures(name: str, tables: list[dict]) -> list[list[object]]:
    """One row per figure: ``[script, "row label: column", value]``; the first column of a
    script's table labels its rows, empty and ``-`` cells are left out."""
    rows: list[list[object]] = []
    for t in tables:
        for row in t["rows"]:
            label = str(row[0])
            for column, value in zip(t["columns"][1:], row[1:], strict=True):
                if value not in ("", "-", None):
                    rows.append([name, f"{label.strip()}: {column}", value])
    return rows


def main(argv: list[str] | None = None, scripts: dict[str, Path] | None = None) -> int:
    scripts = scripts or SCRIPTS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the scripts run")
    parser.add_argument("--only", help=f"comma-separated subset of {', '.join(scripts)}")
    parser.add_argument("--paper", action="store_true", help="warmup_eval: the paper's model too")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(scripts)
    unknown = [n for n in names if n not in scripts]
    if unknown:
        parser.error(f"--only: unknown benchmark {unknown[0]!r} (one of {', '.join(scripts)})")
    rows: list[list[object]] = []
    notes: list[str] = []
    failed: dict[str, str] = {}
    for name in names:
        extra = ["--quick"] if args.quick else []
        if args.paper and name == "warmup_eval":
            extra.append("--paper")
        print(f"running {scripts[name].name} {' '.join(extra)}", file=sys.stderr, flush=True)
        try:
            tables = run_script(scripts[name], extra)
        except RuntimeError as exc:
            failed[name] = str(exc)
            rows.append([name, "FAILED", str(exc).splitlines()[-1][:200]])
            continue
        rows += figures(name, tables)
        notes += [f"{name}: {t['title']}" for t in tables]
    if args.json:
        print(json.dumps({"figures": rows, "notes": notes, "failed": failed}, default=str))
    else:
        title = "pixcli benchmarks" + (" (--quick: tiny sizes, not measurements)" * args.quick)
        print_rows(title, ["benchmark", "figure", "value"], rows)
        for note in notes:
            print(f"- {note}")
        for name, error in failed.items():
            print(f"{name} failed: {error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
