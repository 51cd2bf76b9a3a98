"""The iteration loop every training stage shares: schedule, logging, validation,
checkpoints, resume and interruption.

The stage owns the maths: it passes ``step_fn(step) -> {name: float}``, which draws its
batches, computes its losses and steps its optimisers. The loop owns everything around it:

- the learning rate of every optimiser at every step (``engine.optim.lr_factor``);
- progress (a bar that moves every step, or plain lines every ``log_every`` steps when
  stderr is not a terminal) and the run's logs (``engine.tracking.RunLog``:
  ``train_log.jsonl``, ``metrics.csv``, TensorBoard events when tensorboard is installed);
- validation every ``eval_every`` steps and at the end, keeping ``best.pt`` beside the last
  (an ``evaluate`` returning ``"previews"``, see ``engine.evaluation.evaluate_dataset``,
  also shows those val predictions in TensorBoard);
- ``last.pt`` every ``checkpoint_every`` steps and on Ctrl-C or SIGTERM (under torchrun a
  signal to any rank stops every rank after the same step: ``engine.signals``), written
  atomically, from which the same command resumes; ``model.pt`` (weights only) at the end;
- a clear error when a loss turns NaN or infinite.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pixcli.artifacts import load_checkpoint, save_checkpoint, write_json
from pixcli.config import RUNTIME_KEYS, config_differences
from pixcli.engine.optim import OptimConfig, lr_factor, set_lr
from pixcli.engine.progress import console, make_progress
from pixcli.engine.runtime import Runtime, unwrap
from pixcli.engine.signals import StopRequest
from pixcli.engine.tracking import RunLog
from pixcli.errors import Interrupted, Terminated, UserError
from pixcli.predictor import checkpoint_palette


@dataclass
class LoopConfig:
    iterations: int = 2000
    log_every: int = 20
    eval_every: int = 0  # 0: validate only at the end
    checkpoint_every: int = 250


DIVERGED = "diverged.json"  # written when a loss turned NaN; the rerun may change optim.lr
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
        self.saved_step: int | None = None  # the step last.pt holds, when there is one
        # the step function's own torch.Generator (``step_fn.generator``, e.g. ClassMix's),
        # saved in last.pt and restored on resume so that a resumed run is exact
        self.step_generator: torch.Generator | None = None
        self._resumed_generator: torch.Tensor | None = None
        self.best: dict = {}
        self.last_val: dict = {}
        self.run_log: RunLog | None = None

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

    def _non_finite(self) -> str | None:
        """The first parameter or buffer of the modules that is NaN or infinite, or None."""
        for key, module in self.modules.items():
            for name, value in unwrap(module).state_dict().items():
                if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    return f"{key}.{name}"
        return None

    def _save_last(self) -> None:
        """Write ``last.pt``, and only when every weight and buffer is finite."""
        bad = self._non_finite()
        if bad is not None:
            raise self._diverged(f"weight {bad} became NaN or infinite by step {self.step}")
        if not self.runtime.is_main:
            self.saved_step = self.step
            return
        state = {
            "modules": {k: unwrap(m).state_dict() for k, m in self.modules.items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "best": self.best,
            "last_val": self.last_val,
            "rng": torch.get_rng_state(),
        }
        if self.step_generator is not None:
            state["step_generator"] = self.step_generator.get_state()
        save_checkpoint(self.out_dir / "last.pt", {**self._weights(), "train_state": state})
        self.saved_step = self.step

    def resume(self) -> int:
        """Restore ``last.pt`` if present; returns the step to continue from."""
        path = self.out_dir / "last.pt"
        if not path.is_file():
            return 0
        ckpt = load_checkpoint(path, map_location=self.runtime.device)
        # what may change on resume: the length and the run-time-only settings, and after a
        # NaN stop (DIVERGED) the learning rate
        may_change = {"loop.iterations"} | (
            {"optim.lr"} if (self.out_dir / DIVERGED).is_file() else set()
        )
        differ = config_differences(
            ckpt["meta"].get("config", {}),
            self.meta.get("config", {}),
            ignore=RUNTIME_KEYS | may_change,
        )
        if differ:
            raise UserError(
                f"{path}: this output directory holds a run with other settings "
                f"({'; '.join(differ)}); use a new --out, or --force to start over"
            )
        state = ckpt["train_state"]
        for name, module in self.modules.items():
            unwrap(module).load_state_dict(state["modules"][name])
        for name, opt in self.optimizers.items():
            base_lrs = [group.get("base_lr", group["lr"]) for group in opt.param_groups]
            opt.load_state_dict(state["optimizers"][name])
            for group, base_lr in zip(opt.param_groups, base_lrs, strict=True):
                group["base_lr"] = base_lr  # this run's: optim.lr may change after a NaN stop
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.best = dict(state.get("best", {}))
        self.last_val = dict(state.get("last_val", {}))
        torch.set_rng_state(state["rng"].cpu())
        if "step_generator" in state:
            self._resumed_generator = state["step_generator"].cpu()
        self.step = self.saved_step = int(ckpt["step"])
        if self.runtime.is_main:
            console.print(f"resuming {self.out_dir} from step {self.step}")
        return self.step

    # -- the loop ------------------------------------------------------------------------
    def run(self, step_fn: StepFn) -> dict:
        """Train to ``cfg.iterations``; returns ``{"last": val metrics, "best": ...}``."""
        total = self.cfg.iterations
        main = self.runtime.is_main
        generator = getattr(step_fn, "generator", None)
        if isinstance(generator, torch.Generator):
            self.step_generator = generator
            if self._resumed_generator is not None:
                generator.set_state(self._resumed_generator)
        if total == 0 and main:
            console.print("warning: loop.iterations = 0, so model.pt is the untrained model")
        self.run_log = RunLog(self.out_dir, start=self.step) if main else None
        with make_progress(main, log_every=self.cfg.log_every) as progress, StopRequest() as stop:
            task = progress.add_task("train", total=total, completed=self.step, info="")
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
                        progress.update(task, completed=self.step, info=info)
                        if self.run_log is not None:
                            entry = {"step": self.step, "lr_factor": factor, "it_s": rate, **logs}
                            diagnostics = getattr(step_fn, "diagnostics", None)
                            if callable(diagnostics):  # e.g. the pseudo labels' per-class IoU
                                entry.update(diagnostics())
                            self.run_log.write(entry)
                    else:  # the bar moves every step; the losses change on log steps
                        progress.update(task, completed=self.step)
                    if self._due(self.cfg.eval_every) and self.step < total:
                        self._validate(progress)
                    if self._due(self.cfg.checkpoint_every) and self.step < total:
                        self._save_last()
                    # Ctrl-C or SIGTERM on any rank: every rank stops here (a collective)
                    if self.step < total and stop.agree(self.runtime):
                        raise Terminated() if stop.terminated else KeyboardInterrupt
            except KeyboardInterrupt as exc:
                self._save_last()
                if stop.agreed:  # all ranks are here: none exits before last.pt is written
                    self.runtime.barrier()
                self._close_log()
                raise Interrupted(
                    f"interrupted at step {self.step}; rerun the same command to resume",
                    terminated=isinstance(exc, Terminated),
                ) from None
            self._validate(progress)
        self._close_log()
        self._save_last()
        if main:
            save_checkpoint(self.out_dir / "model.pt", self._weights())
            (self.out_dir / DIVERGED).unlink(missing_ok=True)
        return {"last": self.last_val, "best": self.best, "step": self.step}

    def _close_log(self) -> None:
        if self.run_log is not None:
            self.run_log.close()

    def _due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    def _check_finite(self, logs: dict[str, float]) -> None:
        bad = [k for k, v in logs.items() if not math.isfinite(v)]
        if bad:
            raise self._diverged(
                f"loss {', '.join(bad)} became {logs[bad[0]]} at step {self.step + 1}"
            )

    def _diverged(self, what: str) -> UserError:
        """The one-line error of a NaN stop, naming the last checkpoint (only finite ones
        are written) and how to go on; marks the directory (``DIVERGED``) so that the rerun
        may change ``optim.lr``."""
        if self.runtime.is_main:
            write_json(self.out_dir / DIVERGED, {"what": what, "last_good_step": self.saved_step})
        if self.saved_step is None:
            where = "no checkpoint was written yet, so the rerun starts over"
        else:
            where = f"the rerun resumes from {self.out_dir / 'last.pt'} (step {self.saved_step})"
        return UserError(
            f"{what}: rerun the same command with a lower --set optim.lr=... "
            f"(or check the data); {where}"
        )

    def _validate(self, progress) -> None:
        if self.evaluate is None:
            return
        metrics = self.evaluate()
        previews = metrics.pop("previews", [])  # evaluate_dataset(..., previews=N)
        self.last_val = {"step": self.step, "mIoU": metrics["mIoU"]}
        if self.run_log is not None:
            per_class = {c: row["IoU"] for c, row in metrics.get("per_class", {}).items()}
            entry = {"step": self.step, "val_mIoU": metrics["mIoU"], "val_IoU": per_class}
            self.run_log.write(entry)
            if previews and "classes" in self.meta:
                self.run_log.write_previews(self.step, previews, checkpoint_palette(self.meta))
            progress.console.print(f"step {self.step}: val mIoU {metrics['mIoU']:.2f}")
            if not self.best or metrics["mIoU"] > self.best["mIoU"]:
                self.best = dict(self.last_val)
                if self._non_finite() is not None:  # never a best.pt of NaN weights
                    raise self._diverged(f"weights became NaN or infinite by step {self.step}")
                save_checkpoint(self.out_dir / "best.pt", self._weights())
