"""The training task: `train(cfg)` builds everything from the config, trains, evaluates and
returns the final metrics. It reads top to bottom; Hydra lives only in `regdrop.cli`.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from regdrop.data import build_data
from regdrop.errors import ConfigError, check_keys, check_number
from regdrop.methods import apply_method, begin_step, drop_modules, peak_rate, set_rate_factor
from regdrop.methods.multisample import collapse_copies, multisample_loss
from regdrop.models import build_model
from regdrop.optim import build_lr_schedule, build_optimizer
from regdrop.plots import plot_schedules
from regdrop.schedules import DropSchedule, steps_per_epoch
from regdrop.tracking import RunTracker

TRAINER_KEYS = {
    "epochs", "grad_accum", "device", "precision", "compile", "compile_backend", "deterministic",
    "threads", "eval_every", "eval_batches", "max_steps", "grad_clip", "progress",
}
TOP_LEVEL_KEYS = {
    "task_name", "seed", "tags", "optimized_metric",
    "data", "model", "dropout", "schedule", "optim", "lr", "trainer", "logger", "paths",
}
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def train(cfg: DictConfig) -> dict[str, float]:
    """Train and evaluate the configured model; write metrics files; return the summary."""
    check_keys(cfg, None, TOP_LEVEL_KEYS)
    trainer = cfg.trainer
    check_trainer(trainer)
    output_dir = Path(cfg.paths.output_dir)
    seed_everything(cfg.seed, trainer.deterministic)
    if trainer.threads:
        torch.set_num_threads(trainer.threads)
    device = pick_device(trainer.device)
    autocast_dtype = pick_precision(trainer.precision, device)

    data = build_data(cfg.data, seed=cfg.seed)
    model = build_model(cfg.model, data.info)
    report = apply_method(model, cfg.dropout)  # surgery before any wrapping or compiling
    peak = peak_rate(cfg.dropout)
    world_size = 1  # one process until data parallelism (torchrun) is built
    per_epoch = steps_per_epoch(data.info.num_train, cfg.data.batch_size, trainer.grad_accum, world_size)
    if per_epoch < 1:
        raise ConfigError(
            "data.batch_size",
            f"{data.info.num_train} training images give no optimizer step per epoch at batch "
            f"{cfg.data.batch_size} x grad_accum {trainer.grad_accum} x world size {world_size}",
        )
    total_steps = per_epoch * trainer.epochs
    if trainer.max_steps is not None:
        total_steps = min(total_steps, trainer.max_steps)
    schedule = DropSchedule.from_config(cfg.schedule, per_epoch)

    model.to(device)
    for module in drop_modules(model):
        module.setup_run(total_steps)
    optimizer = build_optimizer(cfg.optim, model)
    lr_schedule = build_lr_schedule(cfg.lr, optimizer, per_epoch, total_steps)
    net = torch.compile(model, backend=trainer.compile_backend) if trainer.compile else model
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype is torch.float16)

    tracker = RunTracker(output_dir, cfg)
    try:
        parameters = sum(p.numel() for p in model.parameters())
        print(f"regdrop: {cfg.model.name} ({parameters / 1e6:.2f}M parameters) on {data.info.name}, "
              f"{device}, {per_epoch} steps/epoch, {total_steps} steps")
        print(f"surgery: {report.summary()}")
        print(f"drop rate: peak {peak:g}, schedule {schedule.describe()}")
        tracker.log_config_extra({
            "surgery": report.counts(), "steps_per_epoch": per_epoch, "total_steps": total_steps,
            "parameters": parameters, "device": str(device),
        })
        plot = plot_schedules(
            [(schedule.name, schedule)], peak, total_steps, per_epoch, output_dir / "drop_schedule.png",
            title=f"{cfg.dropout.name}: {schedule.describe()}",
        )
        tracker.log_image("drop_schedule", plot)

        def autocast():
            if autocast_dtype is None:
                return contextlib.nullcontext()
            return torch.autocast(device.type, dtype=autocast_dtype)

        step, best_acc, test = 0, 0.0, {}
        train_time, train_samples, epoch = 0.0, 0, 0
        epoch_loss = float("nan")
        run_start = time.perf_counter()
        for epoch in range(1, trainer.epochs + 1):
            model.train()
            batches = iter(data.train)
            steps_this_epoch = min(per_epoch, total_steps - step)
            # disable=None: no bar when stderr is not a terminal (batch jobs, SLURM logs).
            bar = tqdm(total=steps_this_epoch, desc=f"epoch {epoch}/{trainer.epochs}",
                       disable=None if trainer.progress else True, leave=False, dynamic_ncols=True)
            loss_total, samples_total, correct_total = 0.0, 0, 0
            for _ in range(steps_this_epoch):
                step_start = time.perf_counter()
                factor = schedule.factor(step)
                set_rate_factor(model, factor)
                begin_step(model, step)
                lr = optimizer.param_groups[0]["lr"]
                step_loss = torch.zeros((), device=device)
                step_correct = torch.zeros((), device=device, dtype=torch.long)
                step_samples = 0
                for _ in range(trainer.grad_accum):
                    x, y = next(batches)
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    with autocast():
                        logits = net(x)
                        loss = multisample_loss(logits.float(), y)
                    scaler.scale(loss / trainer.grad_accum).backward()
                    step_loss += loss.detach() / trainer.grad_accum
                    step_correct += (collapse_copies(logits.detach()).argmax(-1) == y).sum()
                    step_samples += len(y)
                if trainer.grad_clip is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                lr_schedule.step()

                loss_value, correct = step_loss.item(), int(step_correct.item())
                elapsed = time.perf_counter() - step_start
                train_time += elapsed
                train_samples += step_samples
                loss_total += loss_value * step_samples
                samples_total += step_samples
                correct_total += correct
                tracker.log({
                    "step": step, "epoch": epoch, "train/loss": loss_value,
                    "train/acc": correct / step_samples, "lr": lr, "train/drop_rate": peak * factor,
                    "samples_per_s": step_samples / elapsed,
                }, step=step)
                step += 1
                bar.update()
                bar.set_postfix(loss=f"{loss_value:.3f}", acc=f"{correct / step_samples:.3f}",
                                samples_s=f"{step_samples / elapsed:.0f}")
            bar.close()
            epoch_loss = loss_total / max(samples_total, 1)
            last = epoch == trainer.epochs or step >= total_steps
            if epoch % trainer.eval_every == 0 or last:
                test = evaluate(net, data.test, device, autocast, trainer.eval_batches)
                best_acc = max(best_acc, test["test/acc"])
                tracker.log({"step": step, "epoch": epoch, **test, "best/test_acc": best_acc,
                             "train/epoch_loss": epoch_loss, "train/epoch_acc": correct_total / max(samples_total, 1)},
                            step=step)
                print(f"epoch {epoch}: train/loss {epoch_loss:.4f}  test/loss {test['test/loss']:.4f}  "
                      f"test/acc {test['test/acc']:.4f}  best {best_acc:.4f}")
            if last:
                break

        summary = {
            "train/loss": epoch_loss,
            **test,
            "best/test_acc": best_acc,
            "epoch": epoch,
            "step": step,
            "wall_time_s": time.perf_counter() - run_start,
            "train_time_s": train_time,
            "samples_per_s": train_samples / max(train_time, 1e-9),
            "wandb_run_id": tracker.run_id,
        }
    except BaseException:
        tracker.finish(None, exit_code=1)
        raise
    tracker.finish(summary)
    print("final: " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                for k, v in summary.items()))
    print(f"run folder: {output_dir}")
    return summary


@torch.no_grad()
def evaluate(net, loader, device: torch.device, autocast, max_batches: int | None = None) -> dict[str, float]:
    """Mean cross-entropy and accuracy on ``loader`` (its first ``max_batches`` batches if
    given), with the model in evaluation mode."""
    was_training = net.training
    net.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    count = 0
    for index, (x, y) in enumerate(loader):
        if max_batches is not None and index >= max_batches:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            logits = net(x).float()
        loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(-1) == y).sum()
        count += len(y)
    net.train(was_training)
    return {"test/loss": loss_sum.item() / count, "test/acc": correct.item() / count}


def check_trainer(trainer: DictConfig) -> None:
    check_keys(trainer, "trainer", TRAINER_KEYS)
    for key in ("epochs", "grad_accum", "eval_every"):
        check_number(trainer[key], f"trainer.{key}", integer=True, minimum=1)
    for key in ("max_steps", "eval_batches", "threads"):
        check_number(trainer[key], f"trainer.{key}", integer=True, minimum=1, optional=True)
    check_number(trainer.grad_clip, "trainer.grad_clip", above=0, optional=True)
    for key in ("compile", "deterministic", "progress"):
        if not isinstance(trainer[key], bool):
            raise ConfigError(f"trainer.{key}", f"must be true or false, got {trainer[key]!r}")


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch; with ``deterministic``, ask torch for determinism too."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError("trainer.device", f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device", "cuda was asked for but no CUDA device is available; use auto or cpu")
    return device


def pick_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = fp32): bf16 on CUDA and fp32 on CPU for ``auto``."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if name not in PRECISIONS:
        raise ConfigError("trainer.precision", f"unknown precision {name!r}; valid: auto, fp32, bf16, fp16")
    return PRECISIONS[name]

