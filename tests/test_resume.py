"""Lose nothing: a killed, preempted or re-launched run resumes exactly; a finished one is
not rerun; NaN and logger failures end cleanly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import regdrop.train
from regdrop.checkpoint import CHECKPOINT, load_checkpoint
from regdrop.train import Diverged, train
from tests.conftest import ROOT, TINY, TINY_MODELS, run_cli

# Gyro dropout and an early-linear schedule active across the kill; 3 epochs of 6 steps.
RUN = [*TINY, *TINY_MODELS["lenet"], "dropout=gyro", "dropout.sigma=8", "dropout.tau=2",
       "schedule=early", "schedule.shape=linear", "schedule.cutoff_epoch=2", "data.num_train=96",
       "trainer.epochs=3", "trainer.max_steps=null", "trainer.deterministic=true",
       "trainer.checkpoint_every=4", "trainer.log_every=3"]
TIMING = {"wall_time_s", "train_time_s", "samples_per_s", "wandb_run_id"}


def launch(args: list[str], *, stop_at: int | None = None, how: str = "SIGKILL", env=None):
    """`python train.py ARGS`, optionally sending itself ``how`` just before optimizer step
    ``stop_at`` (a test hook put around the real train_step, as a kill would land)."""
    hook = ""
    if stop_at is not None:
        hook = textwrap.dedent(f"""
            import os, signal, regdrop.train as t
            step_fn = t.train_step
            def train_step(parts, batches, step, factor):
                if step == {stop_at}:
                    os.kill(os.getpid(), signal.{how})
                return step_fn(parts, batches, step, factor)
            t.train_step = train_step
        """)
    code = hook + textwrap.dedent(f"""
        import runpy, sys
        sys.argv = ["train.py", *{args!r}]
        runpy.run_path({str(ROOT / "train.py")!r}, run_name="__main__")
    """)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


def steps_logged(folder: Path) -> list[int]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if "train/loss" in r]


def final(folder: Path) -> tuple[dict, dict]:
    metrics = json.loads((folder / "metrics.json").read_text())
    weights = load_checkpoint(folder / CHECKPOINT)["model"]
    return {k: v for k, v in metrics.items() if k not in TIMING}, weights


def assert_same_run(a: Path, b: Path) -> None:
    (metrics_a, weights_a), (metrics_b, weights_b) = final(a), final(b)
    assert metrics_a == metrics_b
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        if isinstance(weights_a[key], torch.Tensor):
            assert torch.equal(weights_a[key], weights_b[key]), key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("whole") / "run"
    result = launch([*RUN, f"hydra.run.dir={folder}", f"paths.data_dir={folder.parent}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def test_a_run_killed_mid_epoch_resumes_to_the_same_result(uninterrupted, tmp_path):
    folder = tmp_path / "run"
    args = [*RUN, f"hydra.run.dir={folder}", f"paths.data_dir={tmp_path}"]
    killed = launch(args, stop_at=10)  # mid epoch 2, two steps after the checkpoint at step 8
    assert killed.returncode == -signal.SIGKILL
    assert load_checkpoint(folder / CHECKPOINT)["state"]["step"] == 8
    assert not (folder / "metrics.json").exists()
    resumed = launch(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at optimizer step 8" in resumed.stdout
    assert steps_logged(folder) == list(range(18))  # each step exactly once
    assert_same_run(uninterrupted, folder)


def test_sigterm_checkpoints_finishes_wandb_and_exits_3_then_resumes(uninterrupted, tmp_path):
    folder = tmp_path / "run"
    args = [*RUN, "logger=wandb", f"hydra.run.dir={folder}", f"paths.data_dir={tmp_path}"]
    stopped = launch(args, stop_at=7, how="SIGTERM", env={**__import__("os").environ, "WANDB_MODE": "offline"})
    assert stopped.returncode == 3, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr and "SIGTERM" in stopped.stderr
    assert load_checkpoint(folder / CHECKPOINT)["state"]["step"] == 8  # the step under way finished
    status = json.loads((folder / "run.json").read_text())
    assert status["status"] == "preempted"
    runs = list((folder / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    resumed = launch(args, env={**__import__("os").environ, "WANDB_MODE": "offline"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert steps_logged(folder) == list(range(18))
    assert_same_run(uninterrupted, folder)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["wandb_run_id"] in runs[0].name  # the same wandb run continued


def test_ctrl_c_stops_cleanly_without_a_traceback(tmp_path):
    folder = tmp_path / "run"
    stopped = launch([*RUN, f"hydra.run.dir={folder}", f"paths.data_dir={tmp_path}"], stop_at=5, how="SIGINT")
    assert stopped.returncode == 130
    assert "Traceback" not in stopped.stderr
    assert json.loads((folder / "run.json").read_text())["status"] == "interrupted"
    assert load_checkpoint(folder / CHECKPOINT)["state"]["step"] == 6


@pytest.mark.slow  # four launches: ~40 s on a quiet machine
def test_a_relaunched_multirun_skips_finished_jobs_resumes_killed_ones_and_runs_the_rest(tmp_path):
    sweep = tmp_path / "sweep"
    common = [*RUN, f"hydra.sweep.dir={sweep}", f"paths.data_dir={tmp_path}"]
    first = launch(["-m", *common, "seed=0,1"])
    assert first.returncode == 0, first.stderr[-3000:]
    killed = launch(["-m", *common, "seed=2"], stop_at=10)
    assert killed.returncode == -signal.SIGKILL
    again = launch(["-m", *common, "seed=0,1,2,3"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("holds a finished run of this config") == 2
    assert again.stdout.count("resumed at optimizer step 8") == 1
    folders = sorted(p.parent for p in sweep.rglob("metrics.json"))
    assert len(folders) == 4
    for folder in folders:
        assert steps_logged(folder) == list(range(18))


def test_a_multirun_without_a_sweep_dir_keeps_its_jobs_in_one_folder_found_again(tmp_path):
    """The default sweep folder is named by the whole command, resolved once by the launcher:
    each job lands in it (not in a folder named by its own share of the sweep), and the same
    command launched again finds it and its finished jobs."""
    command = ["-m", "seed=0,1", *TINY, *TINY_MODELS["lenet"], f"paths.log_dir={tmp_path}",
               f"paths.data_dir={tmp_path / 'data'}"]
    first = run_cli(*command)
    assert first.returncode == 0, first.stderr[-3000:]
    [sweep] = (tmp_path / "train" / "multiruns").iterdir()
    assert (sweep / "multirun.yaml").is_file()
    assert len(list(sweep.rglob("metrics.json"))) == 2
    again = run_cli(*command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("holds a finished run of this config") == 2
    assert list((tmp_path / "train" / "multiruns").iterdir()) == [sweep]


def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_a_loadable_checkpoint(make_config, monkeypatch):
    original = regdrop.train.training_loss

    def poisoned(logits, targets, loss_fn):
        loss = original(logits, targets, loss_fn)
        return loss * float("nan") if poisoned.calls >= 6 else loss

    poisoned.calls = 0
    step_fn = regdrop.train.train_step

    def counting(*args, **kwargs):
        out = step_fn(*args, **kwargs)
        poisoned.calls += 1
        return out

    monkeypatch.setattr(regdrop.train, "training_loss", poisoned)
    monkeypatch.setattr(regdrop.train, "train_step", counting)
    cfg = make_config(*TINY_MODELS["lenet"], "trainer.epochs=3", "trainer.max_steps=null",
                      "trainer.checkpoint_every=2", "trainer.log_every=1")
    with pytest.raises(Diverged, match="step 6"):
        train(cfg)
    folder = Path(cfg.paths.output_dir)
    saved = load_checkpoint(folder / CHECKPOINT)
    assert saved["state"]["step"] <= 6
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    assert json.loads((folder / "run.json").read_text())["status"] == "diverged"


def test_a_wandb_failure_mid_run_is_a_warning_and_the_metrics_are_complete(make_config, monkeypatch, capsys):
    import wandb.sdk.wandb_run as wandb_run

    calls = {"n": 0}
    original = wandb_run.Run.log

    def dying(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise ConnectionError("the wandb service is gone")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(wandb_run.Run, "log", dying)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = make_config(*TINY_MODELS["lenet"], "logger=wandb", "trainer.epochs=2", "trainer.max_steps=null",
                      "trainer.log_every=1")
    summary = train(cfg)
    folder = Path(cfg.paths.output_dir)
    assert "wandb failed" in capsys.readouterr().err
    assert steps_logged(folder) == list(range(8))
    assert json.loads((folder / "metrics.json").read_text())["step"] == summary["step"] == 8
    assert json.loads((folder / "run.json").read_text())["status"] == "finished"


def test_a_finished_run_is_reported_not_rerun_and_rerun_keeps_the_old_files(make_config, capsys):
    cfg = make_config(*TINY_MODELS["lenet"])
    first = train(cfg)
    folder = Path(cfg.paths.output_dir)
    before = (folder / "metrics.jsonl").read_bytes()
    again = train(cfg)
    assert "holds a finished run" in capsys.readouterr().out
    assert again["test/acc"] == first["test/acc"] and (folder / "metrics.jsonl").read_bytes() == before
    cfg.trainer.rerun = True
    train(cfg)
    previous = list(folder.glob("previous-*/metrics.jsonl"))
    assert len(previous) == 1 and previous[0].read_bytes() == before
