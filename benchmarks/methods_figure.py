"""One picture of method studies: a panel per ``methods_quality.py`` work directory.

    python benchmarks/methods_figure.py runs/quality-street runs/quality-dusk --out docs/methods.png

Each panel draws the study's ``quality.json`` (written by ``methods_quality.py``, also with
``--table-only``): a bar per model at its mean target-val mIoU over seeds, a +-std whisker and
a dot per seed, and the warm-up and the oracle as dashed lines. Panels are titled by
``--titles`` (comma-separated) or by the work directories' names.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pixcli.figures import comparison_png, save_png_bytes  # noqa: E402


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("works", type=Path, nargs="+", help="methods_quality.py --work directories")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    p.add_argument("--titles", default="", help="panel titles, comma-separated")
    return p.parse_args(argv)


def fail(message: str) -> NoReturn:
    """Bad input: one line on stderr and exit code 2, as pixcli's commands do."""
    print(message, file=sys.stderr)
    raise SystemExit(2)


def panels(works: list[Path], titles: list[str]) -> list[tuple[str, dict[str, list[float]]]]:
    """``(title, {model: per-seed mIoU})`` of each work directory's ``quality.json``."""
    if titles and len(titles) != len(works):
        fail(f"--titles: {len(titles)} titles for {len(works)} work directories")
    out = []
    for i, work in enumerate(works):
        path = work / "quality.json"
        if not path.is_file():
            fail(f"{path}: missing; run methods_quality.py --table-only --work {work}")
        raw = json.loads(path.read_text())
        out.append((titles[i] if titles else work.name, {m: r["mIoU"] for m, r in raw.items()}))
    return out


def main(argv: list[str] | None = None) -> None:
    a = arguments(argv)
    titles = [t for t in a.titles.split(",") if t]
    save_png_bytes(a.out, comparison_png(panels(a.works, titles)))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
