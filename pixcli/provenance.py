"""Where and how a stage ran, for ``manifest.json``: the command line, UTC start and end, the
host and device, library versions, the git commit of a checkout, and absolute data paths."""

from __future__ import annotations

import platform
import shlex
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent
DATASET_KINDS = ("gta5", "synthia", "cityscapes", "acdc", "darkzurich", "bdd100k", "folder")


def versions() -> dict[str, str]:
    """Versions of pixcli, Python and the libraries whose behaviour shapes the results."""
    import h5py
    import numpy
    import PIL
    import timm
    import torch

    import pixcli

    return {
        "pixcli": pixcli.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": numpy.__version__,
        "Pillow": PIL.__version__,
        "h5py": h5py.__version__,
        "python": platform.python_version(),
    }


@cache
def git_state(directory: Path = PACKAGE_DIR) -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the git checkout holding ``directory`` (pixcli's own
    source by default), or None when it is not in one (an installed wheel) or git is absent.
    ``dirty``: tracked files differ from the commit."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(directory), *args], capture_output=True, text=True, timeout=10
        )
        if done.returncode != 0:
            raise OSError(done.stderr.strip())
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def device_name(device: str) -> str:
    """What ran the stage: the GPU model under CUDA, else the CPU."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        index = torch.cuda.current_device()
        return f"cuda:{index} {torch.cuda.get_device_name(index)}"
    return f"cpu {platform.processor() or platform.machine()}".strip()


def absolute_data_paths(config: dict) -> dict[str, str]:
    """Every ``KIND:PATH`` dataset setting of ``config`` (dotted key -> ``KIND:/abs/path``)."""
    found: dict[str, str] = {}

    def visit(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                visit(value, f"{prefix}{key}.")
            elif isinstance(value, str) and value.partition(":")[0] in DATASET_KINDS:
                kind, _, path = value.partition(":")
                if path:
                    found[f"{prefix}{key}"] = f"{kind}:{Path(path).resolve()}"

    visit(config, "")
    return found


def provenance(
    config: dict, wall_time_s: float, paths: dict[str, Path] | None = None
) -> dict[str, Any]:
    """The manifest's ``provenance``: the run ended now and began ``wall_time_s`` ago."""
    end = datetime.now(UTC)
    start = end - timedelta(seconds=wall_time_s)
    data = absolute_data_paths(config)
    data.update({name: str(Path(p).resolve()) for name, p in (paths or {}).items()})
    return {
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
        "cwd": str(Path.cwd()),
        "started_utc": start.isoformat(timespec="seconds"),
        "ended_utc": end.isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "device": device_name(str(config.get("device", "auto"))),
        "git": git_state(),
        "paths": data,
    }
