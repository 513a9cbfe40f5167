"""The training loop: optimizer steps, periodic evaluation, checkpoints and resume."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist

from mapsage_ds.data.loaders import TrainStream
from mapsage_ds.errors import TrainingError, on_every_rank
from mapsage_ds.evaluation.metrics import SegmentationMetrics
from mapsage_ds.optim.schedule import LRSchedule
from mapsage_ds.optim.unfreeze import UnfreezePlan
from mapsage_ds.runtime import checkpoint
from mapsage_ds.runtime.accelerator import DistributedContext, synchronize
from mapsage_ds.training.run_log import RunLogger
from mapsage_ds.training.throughput import ThroughputWindow


@dataclass
class TrainState:
    """What a checkpoint must carry besides the engine to continue exactly."""

    step: int = 0
    best_miou: float = -math.inf
    best_step: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped_steps: int = 0
    recent_skips: list[int] = field(default_factory=list)  # 1 per skipped step, over the last skip window


NONFINITE_POLICIES = ("stop", "skip")


@dataclass(frozen=True)
class StepOutcome:
    """What one optimizer step returns to the loop.

    Attributes:
        loss_sums: ``loss`` and its named parts, summed over the micro-batches (device tensors).
        lr: the base learning rate of the step.
        skipped: DeepSpeed skipped the update (non-finite gradients on some rank).
        data_seconds: time spent waiting for batches.
    """

    loss_sums: dict[str, torch.Tensor]
    lr: float
    skipped: bool
    data_seconds: float


@dataclass(frozen=True)
class NonFinitePolicy:
    """What a step whose update DeepSpeed skipped (non-finite gradients, an fp16 overflow) does to the run.

    DeepSpeed checks the gradients of every rank for inf/NaN in the step's own reduction and skips
    the update of all ranks together, so a non-finite loss on any rank is seen by every rank
    without another collective.

    Attributes:
        on_nonfinite: ``stop`` ends the run at the first skipped step (except under fp16 loss
            scaling, whose overflows are how the scale is found); ``skip`` counts and logs them.
        max_skipped_share: in either mode, the run stops once more than this share of the last
            ``window`` steps (or of the whole run, at its end) were skipped.
        window: steps over which the share is counted.
        loss_scaling: True under fp16 dynamic loss scaling.
    """

    on_nonfinite: str = "stop"
    max_skipped_share: float = 0.5
    window: int = 50
    loss_scaling: bool = False


@dataclass
class Trainer:
    """Runs ``max_steps`` optimizer steps of ``engine`` on ``stream``.

    ``evaluate`` returns validation metrics; ``on_new_best`` is called (on every rank, it may
    gather) when the validation mIoU improves. ``client_config`` goes into every checkpoint.
    """

    engine: deepspeed.DeepSpeedEngine
    schedule: LRSchedule
    stream: TrainStream
    evaluate: Callable[[], SegmentationMetrics]
    on_new_best: Callable[[int, SegmentationMetrics], None]
    ctx: DistributedContext
    checkpoint_dir: Path
    logger: RunLogger
    max_steps: int
    grad_accum_steps: int
    eval_every: int
    save_every: int
    log_every: int
    keep_checkpoints: int
    client_config: dict[str, Any]
    run_id: str
    nonfinite: NonFinitePolicy = field(default_factory=NonFinitePolicy)
    unfreeze_plan: UnfreezePlan = field(default_factory=UnfreezePlan)
    rebuild_engine: Callable[[int, deepspeed.DeepSpeedEngine], deepspeed.DeepSpeedEngine] | None = None
    state: TrainState = field(default_factory=TrainState)

    def resume(self) -> None:
        """Load the newest checkpoint: engine, RNG, step, data position and best score."""
        client = checkpoint.load_checkpoint(self.engine, self.checkpoint_dir, ctx=self.ctx, run_id=self.run_id)
        self.state = TrainState(**client["train_state"])
        self.stream.load_state_dict(client["data_position"])
        self.logger.message(f"resumed from step {self.state.step} ({self.checkpoint_dir})")

    def fit(self) -> TrainState:
        """Train until ``max_steps``; returns the final state."""
        state = self.state
        self.engine.train()
        window = ThroughputWindow(self.stream.sampler.batch_size * self.grad_accum_steps * self.ctx.world_size)
        while state.step < self.max_steps:
            if self.unfreeze_plan.is_boundary(state.step):
                self.engine = self.rebuild_engine(state.step, self.engine)
                self.engine.train()
                self.logger.message(f"step {state.step}: unfreezing phase {self.unfreeze_plan.phase(state.step)}")
            started = time.perf_counter()
            step = self.train_step()
            window.add_step(time.perf_counter() - started, data_seconds=step.data_seconds)
            self._count_skipped(step.skipped)
            if state.step % self.log_every == 0 or state.step == self.max_steps:
                self._log_train(step.loss_sums, step.lr, window, skipped=step.skipped)
            if state.step % self.eval_every == 0 or state.step == self.max_steps:
                self._validate()
            if state.step % self.save_every == 0 or state.step == self.max_steps:
                self.save()
        self._check_skipped_share(state.skipped_steps, state.step, "of the run's")
        return state

    def train_step(self) -> StepOutcome:
        """One optimizer step (``grad_accum_steps`` micro-batches) at the current step's learning rate.

        The unit the loop repeats and ``scripts/benchmark_train.py`` times against a bare loop.
        """
        engine = self.engine
        lr = self.schedule.apply(engine.optimizer, self.state.step)
        # "loss" and every named part the task returns ("loss_ce", "loss_dice", ...).
        loss_sums: dict[str, torch.Tensor] = {}
        skipped_before = engine.skipped_steps
        data_seconds = 0.0
        for _ in range(self.grad_accum_steps):
            waited = time.perf_counter()
            batch = _to_device(next(self.stream), self.ctx.device)
            data_seconds += time.perf_counter() - waited
            outputs = engine(batch)
            engine.backward(outputs["loss"])
            engine.step()
            for key in (k for k in outputs if k == "loss" or k.startswith("loss_")):
                loss_sums[key] = loss_sums.get(key, 0.0) + outputs[key].detach().float()
        self.state.step += 1
        return StepOutcome(loss_sums=loss_sums, lr=lr, skipped=engine.skipped_steps > skipped_before,
                           data_seconds=data_seconds)

    def _count_skipped(self, skipped: bool) -> None:
        state, policy = self.state, self.nonfinite
        state.recent_skips = [*state.recent_skips, int(skipped)][-policy.window:]
        if not skipped:
            return
        state.skipped_steps += 1
        latest = checkpoint.latest_tag(self.checkpoint_dir)
        where = f"the last good checkpoint is {self.checkpoint_dir / latest}" if latest else "no checkpoint was saved"
        if policy.on_nonfinite == "stop" and not policy.loss_scaling:
            raise on_every_rank(TrainingError(
                f"step {state.step}: non-finite loss or gradients on some rank; DeepSpeed skipped the update and "
                f"train.nonfinite=stop ends the run ({where}). Lower optim.lr, check the data, or set "
                f"train.nonfinite=skip to let isolated steps pass"))
        self.logger.message(f"step {state.step}: update skipped (non-finite gradients); "
                            f"{state.skipped_steps} skipped so far")
        if len(state.recent_skips) == policy.window:
            self._check_skipped_share(sum(state.recent_skips), policy.window, f"of the last {policy.window}")

    def _check_skipped_share(self, skipped: int, steps: int, span: str) -> None:
        if steps > 0 and skipped / steps > self.nonfinite.max_skipped_share:
            latest = checkpoint.latest_tag(self.checkpoint_dir)
            raise on_every_rank(TrainingError(
                f"step {self.state.step}: {skipped} {span} {steps} steps were skipped (non-finite gradients), more "
                f"than train.max_skipped_share={self.nonfinite.max_skipped_share}; the model is not training. "
                f"Last good checkpoint: {self.checkpoint_dir / latest if latest else 'none'}"))

    def _log_train(self, loss_sums: dict[str, torch.Tensor], lr: float, window: ThroughputWindow, *,
                   skipped: bool) -> None:
        # One all-reduce for all parts; every rank's task returns the same keys (same config).
        # It also waits for the device, so the window's figures include the work still queued.
        reduce_started = time.perf_counter()
        names = sorted(loss_sums)
        totals = torch.stack([torch.as_tensor(loss_sums[k], device=self.ctx.device) for k in names])
        dist.all_reduce(totals)
        losses = dict(zip(names, (totals / (self.ctx.world_size * self.grad_accum_steps)).tolist()))
        loss_value = losses["loss"]
        if not math.isfinite(loss_value) and not skipped:
            raise on_every_rank(TrainingError(
                f"step {self.state.step}: the training loss is {loss_value} but DeepSpeed applied the update "
                f"(the gradients were finite); the task's loss is broken"))
        synchronize(self.ctx.device)
        speed = window.summary(extra_seconds=time.perf_counter() - reduce_started)
        values = {**losses, "lr": lr, **speed, "skipped_steps": self.state.skipped_steps}
        self.logger.log(self.state.step, "train", values)
        self.logger.advance(self.state.step, {"loss": loss_value, "lr": lr, "img/s": speed["images_per_s"],
                                              "data%": 100 * speed["data_wait_share"]})

    def _validate(self) -> None:
        metrics = self.evaluate()
        self.engine.train()
        record = {"miou": metrics.miou, "overall_accuracy": metrics.overall_accuracy,
                  "mean_f1": metrics.mean_f1, "iou": metrics.iou}
        self.state.history.append({"step": self.state.step, **record})
        self.logger.log(self.state.step, "val", record)
        self.logger.message(f"step {self.state.step}: val mIoU {metrics.miou:.4f}")
        if metrics.miou > self.state.best_miou:
            self.state.best_miou, self.state.best_step = metrics.miou, self.state.step
            self.on_new_best(self.state.step, metrics)

    def save(self) -> None:
        """Checkpoint now (all ranks)."""
        protect = {self.state.best_step} if self.state.best_step else set()
        client_state = {
            "train_state": vars(self.state).copy(),
            "data_position": self.stream.state_dict(),
            "config": self.client_config,
            checkpoint.MASTER_NAMES: checkpoint.master_names(self.engine),
        }
        checkpoint.save_checkpoint(
            self.engine, self.checkpoint_dir, step=self.state.step, client_state=client_state,
            ctx=self.ctx, run_id=self.run_id, keep=self.keep_checkpoints, protect_steps=protect,
        )


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
