"""The labelled share of a dataset: one seeded split (or a list of names), the same in
``pixcli warmup``, ``pixcli adapt --setting supervised`` and ``--setting semi``, so that a
semi-supervised run and its labelled-only baseline see the same labelled images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pixcli.data.readers import SegDataset
from pixcli.errors import UserError


def share_requested(fraction: float | None, listing: str | None) -> bool:
    """Whether a labelled share was asked for: a fraction or a list of names."""
    return fraction is not None or bool(listing)


def split_labelled(
    dataset: SegDataset, fraction: float | None, listing: Path | None, seed: int
) -> tuple[list[int], list[int]]:
    """Labelled and unlabelled indices: the names in ``listing`` when given, else a seeded
    random ``fraction`` (at least one image; 1: all of them)."""
    n = len(dataset)
    if listing is not None:
        if not listing.is_file():
            raise UserError(f"--labeled-list {listing}: file not found")
        wanted = {line.strip() for line in listing.read_text().splitlines() if line.strip()}
        names = [item[2] for item in dataset.items]
        unknown = sorted(wanted - set(names))
        if unknown:
            raise UserError(f"--labeled-list {listing}: '{unknown[0]}' is not in the dataset")
        labelled = [i for i, name in enumerate(names) if name in wanted]
    elif fraction is not None:
        if not 0 < fraction <= 1:
            raise UserError(f"--labeled-fraction {fraction}: must lie in (0, 1]")
        order = np.random.default_rng(seed).permutation(n)
        labelled = sorted(int(i) for i in order[: max(1, round(fraction * n))])
    else:
        raise UserError("neither --labeled-fraction nor --labeled-list given")
    chosen = set(labelled)
    return labelled, [i for i in range(n) if i not in chosen]


def labelled_share(
    dataset: SegDataset, fraction: float | None, listing: str | None, seed: int
) -> tuple[SegDataset, SegDataset | None]:
    """The labelled part of ``dataset`` and the rest (None when nothing is left)."""
    lab, unlab = split_labelled(dataset, fraction, Path(listing) if listing else None, seed)
    return dataset.subset(lab), dataset.subset(unlab) if unlab else None


def write_split(out: Path, labelled: SegDataset, unlabelled: SegDataset | None) -> None:
    """``labelled.txt`` (and ``unlabelled.txt`` when given) in ``out``: one image name per line,
    the format ``--labeled-list`` reads."""
    for name, part in (("labelled", labelled), ("unlabelled", unlabelled)):
        if part is not None:
            (out / f"{name}.txt").write_text("".join(item[2] + "\n" for item in part.items))
