"""Upgrades keep runs: a config key added with its old behaviour as default leaves every
run where it is (a relaunch skips the finished and resumes the unfinished); a default that
changed under a stored run is refused, naming the key, both values and the ways forward.

Each "release" is a copy of the real config tree, edited as an upgrade would edit it; the
runs are trained for real from it (Hydra's compose with the job's record, as `train.py`
sets it up, or `train.py --config-path` itself in the slow twin)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import regdrop.train
from regdrop.errors import ConfigError
from regdrop.identity import legacy_hash, run_name
from regdrop.opening import MOVED_NOTE
from regdrop.runfolder import CHECKPOINT, SUMMARY
from tests.conftest import CONF, TINY, run_cli

RUN = [*TINY, "trainer.checkpoint_every=2"]
SYNTHETIC = "data/synthetic.yaml"


def release(tmp_path: Path, name: str, edit: Callable[[str], str] = lambda text: text) -> Path:
    """A copy of the config tree with ``edit`` applied to conf/data/synthetic.yaml."""
    conf = tmp_path / name
    shutil.copytree(CONF, conf)
    path = conf / SYNTHETIC
    edited = edit(path.read_text())
    path.write_text(edited)
    return conf


def without_crop_size(text: str) -> str:
    """The release before ``data.crop_size`` existed (it defaults to null: no crop)."""
    kept = [line for line in text.splitlines() if not line.startswith("crop_size:")]
    assert len(kept) < len(text.splitlines())
    return "\n".join(kept) + "\n"


def noise_halved(text: str) -> str:
    """A release whose default ``data.noise`` changed from 1.0 to 0.5."""
    assert "noise: 1.0" in text
    return text.replace("noise: 1.0", "noise: 0.5")


@contextmanager
def job(conf: Path, overrides: list[str], runs: Path) -> Iterator[DictConfig]:
    """The config `train.py --config-path CONF OVERRIDES` runs, in the folder it names
    (``runs/<run_name>``), with Hydra's record of the job set as a job has it."""
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        folder = runs / run_name(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
            cfg.paths.output_dir = str(folder)
            cfg.paths.data_dir = str(runs / "data")
        try:
            yield cfg
        finally:
            HydraConfig.instance().cfg = None


@pytest.fixture
def steps(monkeypatch) -> list[int]:
    """The optimizer steps trained in this process (a step that is resumed is not trained)."""
    trained: list[int] = []
    step_fn = regdrop.train.train_step

    def counting(parts, batches, step, factor):
        trained.append(step)
        return step_fn(parts, batches, step, factor)

    monkeypatch.setattr(regdrop.train, "train_step", counting)
    return trained


def kill_at(monkeypatch, stop_at: int) -> None:
    """The next run dies before optimizer step ``stop_at`` (as a crash would)."""
    step_fn = regdrop.train.train_step

    def dying(parts, batches, step, factor):
        if step == stop_at:
            raise RuntimeError("killed")
        return step_fn(parts, batches, step, factor)

    monkeypatch.setattr(regdrop.train, "train_step", dying)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def test_a_key_added_with_its_old_default_keeps_finished_and_unfinished_runs(tmp_path, monkeypatch, steps):
    old, runs = release(tmp_path, "old", without_crop_size), tmp_path / "runs"
    finished, unfinished = [*RUN, "seed=0"], [*RUN, "seed=1"]
    with job(old, finished, runs) as cfg:
        regdrop.train.train(cfg)
        finished_folder, old_whole_hash = Path(cfg.paths.output_dir), legacy_hash(cfg)
    counting = regdrop.train.train_step
    kill_at(monkeypatch, 3)
    with job(old, unfinished, runs) as cfg, pytest.raises(RuntimeError, match="killed"):
        regdrop.train.train(cfg)
    unfinished_folder = Path(cfg.paths.output_dir)
    assert (unfinished_folder / CHECKPOINT).exists() and not (unfinished_folder / SUMMARY).exists()
    monkeypatch.setattr(regdrop.train, "train_step", counting)
    steps.clear()

    with job(CONF, finished, runs) as cfg:  # today's tree: data.crop_size: null
        assert cfg.data.crop_size is None and legacy_hash(cfg) != old_whole_hash  # the whole config did change
        assert Path(cfg.paths.output_dir) == finished_folder
        summary = regdrop.train.train(cfg)
    assert steps == [] and summary["step"] == 4  # reported, not trained again
    with job(CONF, unfinished, runs) as cfg:
        assert Path(cfg.paths.output_dir) == unfinished_folder
        regdrop.train.train(cfg)
    assert steps == [2, 3]  # resumed after the checkpoint of step 2 (steps count from 0)
    assert (unfinished_folder / SUMMARY).exists()
    assert sorted(p.name for p in runs.glob("*/*")) == sorted([finished_folder.name, unfinished_folder.name])


def test_a_changed_default_is_refused_naming_it_then_pinning_it_reuses_the_run(tmp_path, steps):
    old, new, runs = release(tmp_path, "old"), release(tmp_path, "new", noise_halved), tmp_path / "runs"
    with job(old, RUN, runs) as cfg:
        regdrop.train.train(cfg)
        folder = Path(cfg.paths.output_dir)
    trained, before = len(steps), snapshot(folder)

    with job(new, RUN, runs) as cfg, pytest.raises(ConfigError) as refused:
        assert Path(cfg.paths.output_dir) == folder  # the same command finds the same folder
        regdrop.train.train(cfg)
    message = str(refused.value)
    assert "data.noise was 1.0, is now 0.5" in message
    assert "data.noise=1.0" in message and "trainer.rerun=true" in message
    assert snapshot(folder) == before and len(steps) == trained  # nothing moved, nothing trained

    with job(new, [*RUN, "data.noise=1.0"], runs) as cfg:  # the old value pinned
        pinned = Path(cfg.paths.output_dir)
        summary = regdrop.train.train(cfg)
    assert len(steps) == trained and summary["step"] == 4  # the stored run, found and reused
    assert pinned != folder and (folder / MOVED_NOTE).exists() and (pinned / SUMMARY).exists()

    with job(new, [*RUN, "trainer.rerun=true"], runs) as cfg:  # or: the new value, trained again
        regdrop.train.train(cfg)
    assert len(steps) == trained + 4 and (folder / SUMMARY).exists()


def test_a_run_in_a_folder_named_by_the_whole_config_hash_is_taken_over(tmp_path, steps):
    runs = tmp_path / "runs"
    with job(CONF, RUN, runs) as cfg:
        folder = Path(cfg.paths.output_dir)
        former = folder.parent / legacy_hash(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(former)
        regdrop.train.train(cfg)
    trained = len(steps)
    with job(CONF, RUN, runs) as cfg:
        summary = regdrop.train.train(cfg)
    assert len(steps) == trained and summary["step"] == 4
    assert (folder / SUMMARY).exists() and (former / MOVED_NOTE).exists() and not (former / SUMMARY).exists()


@pytest.mark.slow
def test_the_same_command_after_an_upgrade_skips_or_refuses_with_exit_2(tmp_path):
    """The slow twin: `train.py --config-path` of each release, as a user relaunches it."""
    old, added = release(tmp_path, "old", without_crop_size), release(tmp_path, "added")
    changed = release(tmp_path, "changed", noise_halved)
    command = [*RUN, f"paths.root_dir={tmp_path}", f"paths.data_dir={tmp_path / 'data'}"]
    first = run_cli(f"--config-path={old}", *command)
    assert first.returncode == 0, first.stderr[-2000:]
    folders = list((tmp_path / "outputs").rglob(SUMMARY))
    again = run_cli(f"--config-path={added}", *command)
    assert again.returncode == 0 and "not run again" in again.stdout + again.stderr
    assert list((tmp_path / "outputs").rglob(SUMMARY)) == folders
    before = snapshot(folders[0].parent)
    refused = run_cli(f"--config-path={changed}", *command)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "data.noise was 1.0, is now 0.5" in " ".join(refused.stderr.split())
    assert snapshot(folders[0].parent) == before
