"""The training task: `train(cfg)` checks the whole config, builds everything from it,
trains, evaluates and returns the final metrics. It reads top to bottom; one optimizer step
is `train_step`, one evaluation `evaluate`. Hydra lives only in `regdrop.cli`.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from regdrop.checkpoint import (
    BEST,
    CHECKPOINT,
    TrainState,
    checkpoint_payload,
    load_checkpoint,
    restore_checkpoint,
    save_atomically,
)
from regdrop.config import Checked, validate
from regdrop.data import Data, build_data, set_epoch
from regdrop.diagnostics import Diagnostics, train_test_gap
from regdrop.errors import ConfigError
from regdrop.identity import config_hash
from regdrop.losses import build_loss, describe_loss, hard_labels
from regdrop.methods import (
    apply_method,
    begin_step,
    forward_loss,
    has_unused_parameters,
    peak_rate,
    predictions,
    setup_run,
    training_loss,
)
from regdrop.methods.base import SurgeryReport
from regdrop.models import build_model
from regdrop.opening import FINISHED, RESUME, RunFolder
from regdrop.optim import build_lr_schedule, build_optimizer, describe_optimizer
from regdrop.plots import plot_schedules
from regdrop.preemption import Preemption
from regdrop.rng import capture_global_state, restore_global_state
from regdrop.runfolder import SCHEDULE_PLOT, SURGERY, RunStatus
from regdrop.runtime import GradientAllReduce, Runtime, setup_runtime
from regdrop.schedules import DropSchedule, steps_per_epoch
from regdrop.tracking import RunTracker, StepLog, StepValues


def train(cfg: DictConfig) -> dict[str, float]:
    """Train and evaluate the configured model; write the run folder; return the summary."""
    # Set up: every check before any data is read; the run folder says what to do.
    checked = validate(cfg)
    runtime = setup_runtime(cfg.trainer, cfg.seed)
    folder = RunFolder(Path(cfg.paths.output_dir), cfg)
    decision = runtime.broadcast(folder.open(cfg.trainer.resume, cfg.trainer.rerun) if runtime.is_main else None)
    if decision.action == FINISHED:
        print(f"regdrop: {cfg.paths.output_dir} holds a finished run of this config (test/acc "
              f"{decision.summary.get('test/acc')}); not run again (trainer.rerun=true to rerun it)")
        return decision.summary
    if runtime.is_main and decision.write_config:
        folder.write_config()
    run = build_run(cfg, runtime, checked)

    # Resume: weights, optimizer, schedules, counters and random generators, exactly.
    resumed = restore(run, decision.checkpoint) if decision.action == RESUME else {}
    run.parts.net = wrap(run.model, runtime, cfg.trainer)  # after the restore: DDP copies rank 0's weights

    # The loop: optimizer steps; values are read (and the ranks talk) every trainer.log_every.
    trainer, state = cfg.trainer, run.state
    with RunTracker(run.output_dir, cfg, enabled=runtime.is_main, resumed=resumed) as tracker, \
            Preemption() as preemption:
        announce(run, tracker)
        step_log = StepLog(tracker, trainer.log_every, runtime)
        run_start = time.perf_counter()
        for epoch in range(state.next_epoch(), trainer.epochs + 1):
            batches, bar = start_epoch(run, epoch)
            step_log.start_window()
            for remaining in reversed(range(bar.total)):
                factor = run.schedule.factor(state.step)
                if run.diagnostics.due(state.step):  # not counted as training time
                    show(bar, state, step_log.flush())
                    if runtime.is_main:
                        tracker.log({"step": state.step, "epoch": epoch,
                                     **run.diagnostics.measure(state.step, run.model, factor=factor)}, step=state.step)
                    step_log.start_window()
                out = train_step(run.parts, batches, state.step, factor)
                record = {"step": state.step, "epoch": epoch, "lr": out.lr, "train/drop_rate": run.peak * factor}
                state.step, state.epoch_steps = state.step + 1, state.epoch_steps + 1
                due = step_log.add(record, out.loss, out.correct, out.samples)
                save = bool(trainer.checkpoint_every) and state.step % trainer.checkpoint_every == 0
                # A stop request is agreed on at a flush (the ranks' one collective), never per step.
                alone = preemption.requested and not runtime.distributed
                stop = (due or save or remaining == 0 or alone) and show(bar, state, step_log.flush(preemption.requested))
                if stop or save:
                    checkpoint(run, tracker)
                if stop:
                    tracker.preempted(RunStatus.INTERRUPTED if preemption.signal == signal.SIGINT else RunStatus.PREEMPTED)
                    preemption.stop()
            bar.close()
            if end_epoch(run, tracker, epoch):
                break

        # The end: the summary, in metrics.json, wandb and the log.
        summary = summarize(run, tracker, time.perf_counter() - run_start)
    folder.release()
    runtime.close()
    return summary


@dataclass
class Run:
    """Everything a run trains with, built once by `build_run`: the config and its check,
    the process, the data, the model and its method's surgery, what one step uses
    (`StepParts`), the drop schedule, the run's length, the counters and the diagnostics."""

    cfg: DictConfig
    checked: Checked
    data: Data
    report: SurgeryReport
    parts: StepParts
    schedule: DropSchedule
    per_epoch: int
    total_steps: int
    state: TrainState
    diagnostics: Diagnostics

    @property
    def model(self) -> torch.nn.Module:
        return self.parts.model

    @property
    def runtime(self) -> Runtime:
        return self.parts.runtime

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.paths.output_dir)

    @property
    def peak(self) -> float:
        """The largest peak drop rate of the method's layers."""
        return peak_rate(self.model)


def build_run(cfg: DictConfig, runtime: Runtime, checked: Checked) -> Run:
    """Build everything from the checked config: data (this rank's shard), the model with
    its method (surgery before wrapping or compiling), optimizer, schedules, loss."""
    trainer = cfg.trainer
    data = build_data(cfg.data, seed=cfg.seed, rank=runtime.rank, world_size=runtime.world_size)
    model = build_model(cfg.model, data.info)
    report = apply_method(model, cfg.dropout, seed=cfg.seed)
    runtime.seed_per_rank(cfg.seed)
    per_epoch, total_steps = run_length(cfg, data.info.num_train, runtime.world_size)
    model.to(runtime.device)
    setup_run(model, total_steps, runtime.rank, runtime.world_size)
    optimizer = build_optimizer(cfg.optim, model, global_batch(cfg, runtime))  # lr scaled to the batch
    loss = build_loss(cfg.get("loss"), data.info.num_classes, seed=cfg.seed, rank=runtime.rank)
    parts = StepParts(
        model=model, net=model, optimizer=optimizer,
        lr_schedule=build_lr_schedule(cfg.lr, optimizer, per_epoch, total_steps),
        scaler=torch.amp.GradScaler(runtime.device.type, enabled=runtime.autocast_dtype is torch.float16),
        runtime=runtime, grad_accum=trainer.grad_accum, grad_clip=trainer.grad_clip,
        loss_fn=loss.fn, mix=loss.mix,
    )
    # Off by default; on, it measures without changing training (docs/diagnostics.md).
    diagnostics = Diagnostics(cfg.diagnostics, model, data, seed=cfg.seed,
                              batch_size=cfg.data.batch_size * trainer.grad_accum)
    return Run(cfg, checked, data, report, parts, DropSchedule.from_config(cfg.schedule, per_epoch),
               per_epoch, total_steps, TrainState(), diagnostics)


class Diverged(RuntimeError):
    """The loss (or a weight) stopped being finite; the last good checkpoint is kept."""

    run_status = RunStatus.DIVERGED

    def __init__(self, step: int, output_dir: Path | None = None) -> None:
        self.step = step
        where = f"; the last good checkpoint is {output_dir / CHECKPOINT}" if output_dir else ""
        super().__init__(f"the training loss is not finite at optimizer step {step}{where}. "
                         "Lower optim.lr, clip gradients (trainer.grad_clip) or check the data.")


def announce(run: Run, tracker: RunTracker) -> None:
    """The run's header: what trains on what, the method and its surgery, the schedule."""
    cfg, runtime, model, report = run.cfg, run.runtime, run.model, run.report
    parameters = sum(p.numel() for p in model.parameters())
    tracker.print(f"regdrop: {cfg.model.name} ({parameters / 1e6:.2f}M parameters) on {run.data.info.name}, "
                  f"{runtime.device} x {runtime.world_size} process(es), batch {cfg.data.batch_size} per process x "
                  f"{cfg.trainer.grad_accum} micro-batches = {global_batch(cfg, runtime)} "
                  f"global, {run.per_epoch} steps/epoch, {run.total_steps} steps")
    tracker.print(f"optimizer: {describe_optimizer(cfg.optim, global_batch(cfg, runtime), model)}")
    tracker.print(f"loss: {describe_loss(cfg.get('loss'))}")
    if run.state.step:
        tracker.print(f"resumed at optimizer step {run.state.step} (epoch {run.state.next_epoch()})")
    tracker.print(f"method: {report.describe_method()}")
    tracker.print(f"surgery: {report.summary()} (surgery.txt)")
    tracker.print(f"drop rate: peak {run.peak:g}, schedule {run.schedule.describe()}")
    for warning in run.checked.warnings:
        tracker.warn(warning)
    tracker.write_text(SURGERY, "\n".join(report.lines()))
    tracker.log_config_extra({"surgery": report.counts(), "method_options": report.options,
                              "steps_per_epoch": run.per_epoch, "total_steps": run.total_steps,
                              "parameters": parameters, "device": str(runtime.device),
                              "world_size": runtime.world_size})
    if runtime.is_main:
        plot = plot_schedules([(run.schedule.name, run.schedule)], run.peak, run.total_steps, run.per_epoch,
                              tracker.output_dir / SCHEDULE_PLOT,
                              title=f"{cfg.dropout.name}: {run.schedule.describe()}")
        tracker.log_image("drop_schedule", plot)


def start_epoch(run: Run, epoch: int) -> tuple[Iterator, tqdm]:
    """Begin ``epoch`` (or continue the unfinished one a resume left): its batches, from
    the data position, and a progress bar whose total is the steps it still has."""
    state, trainer = run.state, run.cfg.trainer
    state.begin_epoch(epoch)
    set_epoch(run.data.train, epoch - 1, state.epoch_steps * trainer.grad_accum)
    steps = min(run.per_epoch - state.epoch_steps, run.total_steps - state.step)
    # disable=None: no bar when stderr is not a terminal (batch jobs, SLURM logs).
    bar = tqdm(total=steps, desc=f"epoch {epoch}/{trainer.epochs}", leave=False,
               disable=None if trainer.progress and run.runtime.is_main else True, dynamic_ncols=True)
    return iter(run.data.train), bar


def end_epoch(run: Run, tracker: RunTracker, epoch: int) -> bool:
    """Close ``epoch``: evaluate when due, keep the best, write the checkpoint; True when
    it was the run's last."""
    state, trainer = run.state, run.cfg.trainer
    epoch_means = state.end_epoch()
    last = epoch == trainer.epochs or state.step >= run.total_steps
    best = False
    if epoch % trainer.eval_every == 0 or last:
        test = evaluate(run.parts.net, run.data.test, run.runtime, trainer.eval_batches)
        best = state.record_eval(test)
        tracker.log({"step": state.step, "epoch": epoch, **test, "best/test_acc": state.best_acc,
                     **epoch_means}, step=state.step)
        tracker.print(f"epoch {epoch}: train/loss {state.epoch_loss:.4f}  test/loss {test['test/loss']:.4f}  "
                      f"test/acc {test['test/acc']:.4f}  best {state.best_acc:.4f}")
    state.epoch_finished = True
    checkpoint(run, tracker, best=best and trainer.keep_best)
    return last


def summarize(run: Run, tracker: RunTracker, wall_time_s: float) -> dict:
    """The run's final metrics (with the diagnostics' end-of-run measures), printed and
    handed to the tracker (metrics.json, the wandb summary)."""
    state, trainer = run.state, run.cfg.trainer
    summary = {
        "train/loss": state.epoch_loss, **state.last_eval, "best/test_acc": state.best_acc,
        "epoch": state.epoch, "step": state.step, "wall_time_s": wall_time_s,
        "train_time_s": state.train_time, "samples_per_s": state.train_samples / max(state.train_time, 1e-9),
        "wandb_run_id": tracker.run_id, **train_test_gap(state.epoch_means, state.last_eval),
        **(run.diagnostics.evaluate(run.model, run.data.test, run.output_dir, trainer.eval_batches)
           if run.runtime.is_main else {}),
    }
    tracker.print("final: " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in summary.items()))
    tracker.print(f"run folder: {run.output_dir}")
    tracker.finish(summary)
    return summary


def wrap(model: torch.nn.Module, runtime: Runtime, trainer: DictConfig):
    """The module the steps call: under data parallelism DDP around the model, or, when a
    step may skip branches (block-mode stochastic depth), `GradientAllReduce` (no
    ``find_unused_parameters`` graph walk); compiled when asked."""
    net = model
    if runtime.distributed and has_unused_parameters(model):
        net = GradientAllReduce(model, runtime.world_size)
    elif runtime.distributed:
        net = DistributedDataParallel(model, device_ids=[runtime.device] if runtime.device.type == "cuda" else None)
    return torch.compile(net, backend=trainer.compile_backend) if trainer.compile else net


def checkpoint(run: Run, tracker: RunTracker, best: bool = False) -> None:
    """Write the run's checkpoint (rank 0; every rank's random state gathered into it)."""
    runtime, parts = run.runtime, run.parts
    finite = torch.stack([p.detach().isfinite().all() for p in parts.model.parameters()]).all()
    if not bool(finite):
        raise Diverged(run.state.step, run.output_dir)
    rng = runtime.gather(capture_global_state())
    if not runtime.is_main:
        return
    facts = {"config_hash": config_hash(run.cfg), "metrics_bytes": tracker.metrics_bytes(),
             "wandb_run_id": tracker.run_id, "diagnostics_initial": run.diagnostics.initial,
             "world_size": runtime.world_size}
    payload = checkpoint_payload(stateful(parts), run.state, rng, facts)
    path = run.output_dir / CHECKPOINT
    save_atomically(payload, path, keep_previous=True)  # checkpoint.prev.pt: the one before
    tracker.log_checkpoint(path, "last")  # a wandb artifact if logger.log_checkpoints asks
    if best:
        save_atomically(payload, run.output_dir / BEST)
        tracker.log_checkpoint(run.output_dir / BEST, "best")


def restore(run: Run, path: Path) -> dict:
    """Load a checkpoint into the run (this rank's random state); return what the tracker
    needs (metrics length, wandb id)."""
    saved = load_checkpoint(path)
    restore_global_state(restore_checkpoint(saved, stateful(run.parts), run.state, run.runtime.rank))
    if saved.get("diagnostics_initial"):
        run.diagnostics.initial = [t.to(run.runtime.device) for t in saved["diagnostics_initial"]]
    return saved


def stateful(parts: StepParts) -> dict[str, Any]:
    """The objects whose ``state_dict`` a checkpoint holds, by their key in it."""
    return {"model": parts.model, "optimizer": parts.optimizer, "lr_schedule": parts.lr_schedule,
            "scaler": parts.scaler}


def global_batch(cfg: DictConfig, runtime: Runtime) -> int:
    """Samples per optimizer step over all processes (the LR scaling rule's batch)."""
    return cfg.data.batch_size * cfg.trainer.grad_accum * runtime.world_size


def run_length(cfg: DictConfig, num_train: int, world_size: int = 1) -> tuple[int, int]:
    """Optimizer steps per epoch and in the whole run (``trainer.max_steps`` caps it)."""
    trainer = cfg.trainer
    per_epoch = steps_per_epoch(num_train, cfg.data.batch_size, trainer.grad_accum, world_size)
    if per_epoch < 1:
        raise ConfigError(
            "data.batch_size",
            f"{num_train} training images give no optimizer step per epoch at batch "
            f"{cfg.data.batch_size} x grad_accum {trainer.grad_accum} x {world_size} process(es)",
        )
    total_steps = per_epoch * trainer.epochs
    if trainer.max_steps is not None:
        total_steps = min(total_steps, trainer.max_steps)
    return per_epoch, total_steps


@dataclass
class StepParts:
    """What one optimizer step uses: the model (``net`` is it compiled, or itself), the
    optimizer and its LR schedule, the fp16 grad scaler, how to accumulate and clip, the
    loss and the batch mixer (mixup / CutMix: ``mix(x, y, step, micro)`` gives mixed
    images and soft targets; None: batches as loaded)."""

    model: torch.nn.Module
    net: Callable[[torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    runtime: Runtime
    grad_accum: int = 1
    grad_clip: float | None = None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
    mix: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None


@dataclass
class StepOutput:
    """One optimizer step's mean loss and correct predictions (device tensors: reading
    them waits for the device), its sample count and the learning rate it used."""

    loss: torch.Tensor
    correct: torch.Tensor
    samples: int
    lr: float


def train_step(parts: StepParts, batches: Iterator, step: int, factor: float) -> StepOutput:
    """One optimizer step (``step`` from 0) at drop-rate factor ``factor``: the methods'
    step begins once, then ``grad_accum`` micro-batches from ``batches``, each loss divided
    by their number, gradient clipping, the optimizer and LR-schedule steps. No host sync."""
    begin_step(parts.model, step, factor)
    device, lr = parts.runtime.device, parts.optimizer.param_groups[0]["lr"]
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    samples = 0
    for micro in range(parts.grad_accum):
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if parts.mix is not None:  # y becomes B x C soft targets
            x, y = parts.mix(x, y, step, micro)
        # Under DDP only the last micro-batch's backward all-reduces the gradients.
        last = micro == parts.grad_accum - 1
        sync = contextlib.nullcontext() if last or not hasattr(parts.net, "no_sync") else parts.net.no_sync()
        with sync:
            with parts.runtime.autocast():
                # The method's forward pass(es) and loss (R-Drop runs two); one pass's loss:
                logits, loss = forward_loss(parts.net, x, y, lambda out, t: training_loss(out.float(), t, parts.loss_fn))
            parts.scaler.scale(loss / parts.grad_accum).backward()
        loss_sum += loss.detach()
        correct += (predictions(logits.detach()).argmax(-1) == hard_labels(y)).sum()
        samples += len(y)
    # Without DDP's reducer (a model that skips branches): the step's one all-reduce.
    reducer = getattr(parts.net, "_orig_mod", parts.net)
    if isinstance(reducer, GradientAllReduce):
        reducer.all_reduce_gradients()
    if parts.grad_clip is not None:
        parts.scaler.unscale_(parts.optimizer)
        torch.nn.utils.clip_grad_norm_(parts.model.parameters(), parts.grad_clip)
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    parts.optimizer.zero_grad(set_to_none=True)
    parts.lr_schedule.step()
    return StepOutput(loss_sum / parts.grad_accum, correct, samples, lr)


@torch.no_grad()
def evaluate(net, loader, runtime: Runtime, max_batches: int | None = None) -> dict[str, float]:
    """Mean cross-entropy and accuracy on ``loader`` (its first ``max_batches`` batches if
    given), with the model in evaluation mode."""
    was_training = net.training
    net.eval()
    loss_sum = torch.zeros((), device=runtime.device)
    correct = torch.zeros((), device=runtime.device, dtype=torch.long)
    count = 0
    for index, (x, y) in enumerate(loader):
        if max_batches is not None and index >= max_batches:
            break
        x, y = x.to(runtime.device, non_blocking=True), y.to(runtime.device, non_blocking=True)
        with runtime.autocast():
            logits = predictions(net(x)).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(-1) == y).sum()
        count += len(y)
    net.train(was_training)
    totals = torch.stack([loss_sum, correct.to(loss_sum.dtype), torch.tensor(float(count), device=runtime.device)])
    loss, right, count = runtime.all_reduce_sum(totals).tolist()  # one read (each rank: its shard)
    return {"test/loss": loss / count, "test/acc": right / count}


def show(bar: tqdm, state: TrainState, values: StepValues) -> bool:
    """Count a read of the step log into the train state and the progress bar; stop on a
    loss that is not finite. True when the ranks agreed to stop (`StepLog.flush`)."""
    for step, loss in zip(values.steps, values.losses, strict=True):
        if not math.isfinite(loss):
            raise Diverged(step)
    state.add(values)
    if values.steps:
        bar.update(len(values.steps))
        samples = values.samples[-1]
        bar.set_postfix(loss=f"{values.losses[-1]:.3f}", acc=f"{values.correct[-1] / samples:.3f}",
                        samples_s=f"{sum(values.samples) / max(values.seconds, 1e-9):.0f}")
    return values.stop
