"""The iteration loop every training stage shares: schedule, logging, validation,
checkpoints, resume and interruption.

The stage owns the maths: it passes ``step_fn(step) -> {name: float}``, which draws its
batches, computes its losses and steps its optimisers. The loop owns everything around it:

- the learning rate of every optimiser at every step (``engine.optim.lr_factor``);
- a rich progress bar and ``train_log.jsonl`` (one JSON object per logged step);
- validation every ``eval_every`` steps and at the end, keeping ``best.pt`` beside the last;
- ``last.pt`` every ``checkpoint_every`` steps and on Ctrl-C, written atomically, from
  which the same command resumes; ``model.pt`` (weights only) at the end;
- a clear error when a loss turns NaN or infinite.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pixcli.artifacts import load_checkpoint, save_checkpoint
from pixcli.engine.optim import OptimConfig, lr_factor, set_lr
from pixcli.engine.progress import console, make_progress
from pixcli.engine.runtime import Runtime, unwrap
from pixcli.errors import Interrupted, UserError


@dataclass
class LoopConfig:
    iterations: int = 2000
    log_every: int = 20
    eval_every: int = 0  # 0: validate only at the end
    checkpoint_every: int = 250


StepFn = Callable[[int], dict[str, float]]
EvalFn = Callable[[], dict]


class TrainLoop:
    """Runs ``step_fn`` for ``cfg.iterations`` steps; see the module docstring.

    ``modules`` are saved and restored by name; ``modules[export]`` is the Segmentor whose
    weights become ``model.pt`` and ``best.pt``. ``meta`` is stored in every checkpoint
    (model config, classes, palette, stage configuration); a resumed run must have the same
    ``meta["config"]`` except for the iteration count and ``compile``.
    """

    def __init__(
        self,
        out_dir: Path,
        runtime: Runtime,
        cfg: LoopConfig,
        optim_cfg: OptimConfig,
        modules: dict[str, nn.Module],
        optimizers: dict[str, torch.optim.Optimizer],
        meta: dict,
        evaluate: EvalFn | None = None,
        scaler: torch.amp.GradScaler | None = None,
        export: str = "model",
    ) -> None:
        self.out_dir = out_dir
        self.runtime = runtime
        self.cfg = cfg
        self.optim_cfg = optim_cfg
        self.modules = modules
        self.optimizers = optimizers
        self.meta = meta
        self.evaluate = evaluate
        self.scaler = scaler
        self.export = export
        self.step = 0
        self.best: dict = {}
        self.last_val: dict = {}

    # -- checkpoints ---------------------------------------------------------------------
    def _weights(self) -> dict:
        model = unwrap(self.modules[self.export])
        return {
            "model_config": model.config.to_dict(),
            "state_dict": model.state_dict(),
            "step": self.step,
            **{k: v for k, v in self.meta.items() if k in ("classes", "palette")},
            "meta": {k: v for k, v in self.meta.items() if k not in ("classes", "palette")},
        }

    def _save_last(self) -> None:
        if not self.runtime.is_main:
            return
        state = {
            "modules": {k: unwrap(m).state_dict() for k, m in self.modules.items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "best": self.best,
            "last_val": self.last_val,
            "rng": torch.get_rng_state(),
        }
        save_checkpoint(self.out_dir / "last.pt", {**self._weights(), "train_state": state})

    def resume(self) -> int:
        """Restore ``last.pt`` if present; returns the step to continue from."""
        path = self.out_dir / "last.pt"
        if not path.is_file():
            return 0
        ckpt = load_checkpoint(path, map_location=self.runtime.device)
        old = copy.deepcopy(ckpt["meta"].get("config", {}))
        new = copy.deepcopy(self.meta.get("config", {}))
        for cfg in (old, new):  # what may change on resume: the length, torch.compile
            cfg.get("loop", {}).pop("iterations", None)
            cfg.pop("compile", None)
        if old != new:
            raise UserError(
                f"{path}: this output directory holds a run with another configuration; "
                "use a new --out, or delete the directory to start over"
            )
        state = ckpt["train_state"]
        for name, module in self.modules.items():
            unwrap(module).load_state_dict(state["modules"][name])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.best = dict(state.get("best", {}))
        self.last_val = dict(state.get("last_val", {}))
        torch.set_rng_state(state["rng"].cpu())
        self.step = int(ckpt["step"])
        if self.runtime.is_main:
            console.print(f"resuming {self.out_dir} from step {self.step}")
        return self.step

    # -- the loop ------------------------------------------------------------------------
    def run(self, step_fn: StepFn) -> dict:
        """Train to ``cfg.iterations``; returns ``{"last": val metrics, "best": ...}``."""
        total = self.cfg.iterations
        log_path = self.out_dir / "train_log.jsonl"
        main = self.runtime.is_main
        with make_progress(main) as progress:
            task = progress.add_task("train", total=total, completed=self.step, rate="", info="")
            tick, tick_step = time.perf_counter(), self.step
            try:
                while self.step < total:
                    factor = lr_factor(self.step, total, self.optim_cfg)
                    for opt in self.optimizers.values():
                        set_lr(opt, factor)
                    logs = step_fn(self.step)
                    self._check_finite(logs)
                    self.step += 1
                    if self.step % self.cfg.log_every == 0 or self.step == total:
                        now = time.perf_counter()
                        rate = (self.step - tick_step) / max(now - tick, 1e-9)
                        tick, tick_step = now, self.step
                        info = " ".join(f"{k} {v:.3f}" for k, v in logs.items())
                        progress.update(
                            task, completed=self.step, rate=f"{rate:.2f} it/s", info=info
                        )
                        if main:
                            entry = {"step": self.step, "lr_factor": factor, "it_s": rate, **logs}
                            diagnostics = getattr(step_fn, "diagnostics", None)
                            if callable(diagnostics):  # e.g. the pseudo labels' per-class IoU
                                entry.update(diagnostics())
                            with open(log_path, "a") as fh:
                                fh.write(json.dumps(entry) + "\n")
                    if self._due(self.cfg.eval_every) and self.step < total:
                        self._validate(progress)
                    if self._due(self.cfg.checkpoint_every) and self.step < total:
                        self._save_last()
            except KeyboardInterrupt:
                self._save_last()
                raise Interrupted(
                    f"interrupted at step {self.step}; rerun the same command to resume"
                ) from None
            self._validate(progress)
        self._save_last()
        if main:
            save_checkpoint(self.out_dir / "model.pt", self._weights())
        return {"last": self.last_val, "best": self.best, "step": self.step}

    def _due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    def _check_finite(self, logs: dict[str, float]) -> None:
        bad = [k for k, v in logs.items() if not math.isfinite(v)]
        if bad:
            raise UserError(
                f"loss {', '.join(bad)} became {logs[bad[0]]} at step {self.step + 1}: lower "
                "the learning rate or check the data "
                f"(last good checkpoint: {self.out_dir / 'last.pt'})"
            )

    def _validate(self, progress) -> None:
        if self.evaluate is None:
            return
        metrics = self.evaluate()
        self.last_val = {"step": self.step, "mIoU": metrics["mIoU"]}
        if self.runtime.is_main:
            with open(self.out_dir / "train_log.jsonl", "a") as fh:
                fh.write(json.dumps({"step": self.step, "val_mIoU": metrics["mIoU"]}) + "\n")
            progress.console.print(f"step {self.step}: val mIoU {metrics['mIoU']:.2f}")
            if not self.best or metrics["mIoU"] > self.best["mIoU"]:
                self.best = dict(self.last_val)
                save_checkpoint(self.out_dir / "best.pt", self._weights())
