"""A run killed anywhere and resumed is the run never killed, bit for bit, for every source
of randomness a run draws from; and the loop's bookkeeping around the kill (the data
position under accumulation, the epoch-end checkpoint, the evaluation cadence, best.pt,
the grad scaler) is what a resume needs.

The kill is in-process: the real `train_step` raises after N optimizer steps, as a SIGKILL
would stop the run, and the resume is a fresh `train()` of the same config in the same
folder. The subprocess kills of tests/test_resume.py cover the process boundary; these cover
the breadth cheaply. Each compares every record of ``metrics.jsonl`` (timings aside) and the
whole final checkpoint (weights, optimizer, schedules, scaler, generators) with an
uninterrupted run, with `torch.equal`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import regdrop.train
from regdrop.checkpoint import BEST, CHECKPOINT, load_checkpoint
from regdrop.methods import REGISTRY
from regdrop.train import train
from tests.conftest import TINY, TINY_MODELS, compose_config

LENET = TINY_MODELS["lenet"]
# 96 images at batch 16: 6 optimizer steps an epoch, 2 epochs; a checkpoint every 4 steps,
# so a kill at step 9 resumes from step 8, two steps into epoch 2.
# One thread: the runs are tiny, and the test workers already share the cores.
RUN = [*TINY, "data.num_train=96", "data.image_size=16", "data.channels=1", "trainer.epochs=2",
       "trainer.max_steps=null", "trainer.deterministic=true", "trainer.threads=1", "trainer.checkpoint_every=4",
       "trainer.log_every=3"]
PER_EPOCH, KILL_AT = 6, 9
# One method per source of randomness; accumulation; the fp16 grad scaler.
CASES = {
    # torch's global generator (standard dropout's masks)
    "standard": [*LENET, "dropout=standard"],
    # the method's own generators and state: bank, selection, step
    "gyro": [*LENET, "dropout=gyro", "dropout.sigma=8", "dropout.tau=2",
             "schedule=early", "schedule.shape=linear", "schedule.cutoff_epoch=1.5"],
    # block-mode gate generators (in the model's state)
    "block_depth": [*TINY_MODELS["vit_tiny"], "dropout=stochastic_depth", "dropout.mode=block",
                    "dropout.drop_rate=0.5"],
    # per-sample drop-path masks from the global generator
    "sample_depth": [*TINY_MODELS["vit_tiny"], "dropout=stochastic_depth", "dropout.mode=sample",
                     "dropout.drop_rate=0.5"],
    # weight masks from the global generator, per batch
    "dropconnect": [*LENET, "dropout=dropconnect"],
    # timm's mixup / CutMix, seeded per (step, micro-batch, rank)
    "mixup_cutmix": [*LENET, "loss=mixup_cutmix"],
    # two micro-batches a step: the data position inside the epoch counts micro-batches
    "grad_accum": [*LENET, "dropout=standard", "data.batch_size=8", "trainer.grad_accum=2"],
    # the fp16 grad scaler's state (its growth tracker counts steps) rides in the checkpoint
    "fp16_scaler": [*TINY_MODELS["mlp"], "dropout=standard", "trainer.precision=fp16"],
}
# Every registered method the cases above leave out, on its declared example model at its
# config file's values: a new method is covered without a line here.
CASES.update({name: [*TINY_MODELS[method.example_model], f"dropout={name}"] for name, method in REGISTRY.items()
              if not any(f"dropout={name}" in overrides for overrides in CASES.values())})
TIMINGS = {"samples_per_s", "wall_time_s", "train_time_s", "wandb_run_id"}
STATE_TIMINGS = {"train_time"}


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """``trainer.threads`` sets torch's process-wide thread count: give it back after each test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


class Killed(Exception):
    """Where a SIGKILL would have stopped the process."""


def kill_before_step(monkeypatch, step: int) -> None:
    """Make the run die as optimizer step ``step`` begins (the steps before it are done)."""
    real_step = regdrop.train.train_step

    def dying(parts, batches, at, factor):
        if at == step:
            raise Killed(f"killed before optimizer step {at}")
        return real_step(parts, batches, at, factor)

    monkeypatch.setattr(regdrop.train, "train_step", dying)


def records(folder: Path) -> list[dict]:
    """Every line of ``metrics.jsonl``, timings left out."""
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines]


def assert_equal_tree(a, b, where: str = "checkpoint") -> None:
    """Two nested checkpoint values equal: tensors with `torch.equal`, the rest with ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_equal_tree(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_equal_tree(x, y, f"{where}[{index}]")
    elif hasattr(a, "__array__"):  # numpy's generator state
        assert (a == b).all(), where
    else:
        assert a == b, where


def assert_same_run(whole: Path, resumed: Path) -> None:
    """The resumed run logged what the whole run logged and ended in the same checkpoint."""
    assert records(resumed) == records(whole)
    summary = {k: v for k, v in json.loads((whole / "metrics.json").read_text()).items() if k not in TIMINGS}
    again = {k: v for k, v in json.loads((resumed / "metrics.json").read_text()).items() if k not in TIMINGS}
    assert again == summary
    a, b = load_checkpoint(whole / CHECKPOINT), load_checkpoint(resumed / CHECKPOINT)
    for saved in (a, b):
        for key in STATE_TIMINGS:
            saved["state"].pop(key)
        saved.pop("metrics_bytes")  # the resumed file's length is checked line by line above
    assert_equal_tree(a, b)


def kill_and_resume(tmp_path: Path, monkeypatch, overrides: list[str], kill_at: int) -> tuple[Path, Path]:
    """An uninterrupted run and one killed before ``kill_at`` then resumed: their folders."""
    whole = compose_config([*RUN, *overrides], tmp_path / "whole")
    killed = whole.copy()
    killed.paths.output_dir = str(tmp_path / "killed")
    train(whole)
    with monkeypatch.context() as patch:
        kill_before_step(patch, kill_at)
        with pytest.raises(Killed):
            train(killed)
    train(killed)
    return Path(whole.paths.output_dir), Path(killed.paths.output_dir)


@pytest.mark.parametrize("case", list(CASES))
def test_a_run_killed_mid_epoch_resumes_bit_exact(case, tmp_path, monkeypatch):
    whole, resumed = kill_and_resume(tmp_path, monkeypatch, CASES[case], KILL_AT)
    assert [r["step"] for r in records(resumed) if "train/loss" in r] == list(range(2 * PER_EPOCH))
    assert_same_run(whole, resumed)


def test_a_run_killed_right_after_its_epoch_end_checkpoint_resumes_bit_exact(tmp_path, monkeypatch):
    """Only the epoch-end checkpoint exists at the kill; the resume starts the next epoch
    (the finished one is neither trained nor evaluated again)."""
    whole, resumed = kill_and_resume(tmp_path, monkeypatch, [*CASES["standard"], "trainer.checkpoint_every=null"],
                                     PER_EPOCH)
    evaluations = [r["epoch"] for r in records(resumed) if "test/acc" in r]
    assert evaluations == [1, 2]
    assert_same_run(whole, resumed)


def test_the_grad_scaler_state_is_saved_and_restored(tmp_path, monkeypatch):
    """A scaler whose scale backed off and whose growth tracker counted: both in the
    checkpoint, and both in force after the resume (not a fresh scaler's 65536 and 0)."""
    cfg = compose_config([*RUN, *CASES["fp16_scaler"]], tmp_path / "run")
    seen = {}
    real_step = regdrop.train.train_step

    def step(parts, batches, at, factor):
        if at == 0:  # as after overflows: the scale backed off twice, the tracker restarted
            parts.scaler.load_state_dict({**parts.scaler.state_dict(), "scale": 2.0**14, "_growth_tracker": 0})
        seen.setdefault(at, parts.scaler.state_dict())
        return real_step(parts, batches, at, factor)

    with monkeypatch.context() as patch:
        patch.setattr(regdrop.train, "train_step", step)
        kill_before_step(patch, KILL_AT)
        with pytest.raises(Killed):
            train(cfg)
    saved = load_checkpoint(Path(cfg.paths.output_dir) / CHECKPOINT)["scaler"]
    assert saved["scale"] == 2.0**14 and saved["_growth_tracker"] == 8
    with monkeypatch.context() as patch:
        patch.setattr(regdrop.train, "train_step", step)
        seen.clear()
        train(cfg)
    assert seen[8]["scale"] == 2.0**14 and seen[8]["_growth_tracker"] == 8


def test_evaluation_follows_eval_every_and_always_ends_the_run(tmp_path):
    cfg = compose_config([*RUN, *LENET, "data.num_train=32", "trainer.epochs=5", "trainer.eval_every=2"],
                         tmp_path / "run")
    train(cfg)
    evaluated = [r["epoch"] for r in records(Path(cfg.paths.output_dir)) if "test/acc" in r]
    assert evaluated == [2, 4, 5]


def test_best_pt_keeps_the_first_of_equal_accuracies(tmp_path):
    """A learning rate too small to change a prediction: every epoch ties the first, and
    best.pt stays the checkpoint of epoch 1."""
    cfg = compose_config([*RUN, *LENET, "data.num_train=32", "trainer.epochs=3", "trainer.checkpoint_every=null",
                          "trainer.keep_best=true", "optim.lr=1e-12"], tmp_path / "run")
    train(cfg)
    folder = Path(cfg.paths.output_dir)
    accuracies = [r["test/acc"] for r in records(folder) if "test/acc" in r]
    assert len(accuracies) == 3 and len(set(accuracies)) == 1 and accuracies[0] > 0  # a real tie
    best = load_checkpoint(folder / BEST)["state"]
    assert (best["epoch"], best["step"]) == (1, 2)
