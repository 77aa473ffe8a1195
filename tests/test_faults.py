"""Lose nothing, part two: damaged files of a run folder, disk and permission faults, and
signals. Each test breaks a file or the environment the way a crash, a full disk or a user
would, and checks the exit status, the one message naming the file, that no traceback is
shown, that every file written before is byte-identical, and that the advertised way
forward works (docs/faults.md lists them)."""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import regdrop.checkpoint
import regdrop.tracking
import regdrop.train
from regdrop.checkpoint import CHECKPOINT, PREVIOUS, load_checkpoint
from regdrop.cli import FAILED_JOBS, _rebuild_job_failed, run
from regdrop.train import train
from tests.conftest import ROOT, TINY, TINY_MODELS, compose_config, run_cli

# 2 epochs of 4 steps, a checkpoint every 2 steps: a crash at step 7 leaves checkpoint.pt at
# step 6 and checkpoint.prev.pt at step 4 (the end of epoch 1).
RUN = [*TINY, *TINY_MODELS["lenet"], "trainer.epochs=2", "trainer.max_steps=null",
       "trainer.checkpoint_every=2", "trainer.log_every=1", "trainer.deterministic=true"]
CRASH_AT = 7


class Crash(Exception):
    """A process dying mid-run, in-process (its files are what a kill leaves, bar run.json)."""


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def config(folder: Path, *overrides: str):
    return compose_config([*RUN, *overrides], folder)


def crash_at(step: int):
    """A train_step that dies just before optimizer step ``step``."""
    real = regdrop.train.train_step

    def train_step(parts, batches, at, factor):
        if at == step:
            raise Crash(f"killed before step {step}")
        return real(parts, batches, at, factor)

    return train_step


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A finished run, and the same config crashed before step 7 (two checkpoints kept)."""
    root = tmp_path_factory.mktemp("runs")
    train(config(root / "finished"))
    real = regdrop.train.train_step
    regdrop.train.train_step = crash_at(CRASH_AT)
    try:
        with pytest.raises(Crash):
            train(config(root / "crashed"))
    finally:
        regdrop.train.train_step = real
    return {"finished": root / "finished", "crashed": root / "crashed"}


def copy_of(runs: dict[str, Path], which: str, tmp_path: Path) -> Path:
    folder = tmp_path / which
    shutil.copytree(runs[which], folder)
    (folder / ".lock").unlink(missing_ok=True)
    return folder


def rejected(cfg, capsys) -> str:
    """Run ``cfg`` through the CLI's task: exit status 2 and one paragraph without a traceback."""
    with pytest.raises(SystemExit) as stop:
        run(cfg)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    assert err.startswith("regdrop: ") and "Traceback" not in err
    assert err.strip().count("\n\n") == 0  # one paragraph
    return " ".join(err.split())  # the paragraph unwrapped


def same_weights(a: Path, b: Path) -> None:
    first, second = load_checkpoint(a / CHECKPOINT)["model"], load_checkpoint(b / CHECKPOINT)["model"]
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


# -- one rule for every file regdrop reads back -------------------------------------------


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbage(path: Path) -> None:
    path.write_bytes(os.urandom(4096))


def foreign(path: Path) -> None:
    torch.save({"weights": torch.zeros(3)}, path)  # a torch file, not a regdrop checkpoint


@pytest.mark.parametrize("damage", [truncate, garbage, foreign], ids=["truncated", "garbage", "foreign"])
def test_a_damaged_checkpoint_is_named_with_the_ways_forward_and_nothing_changes(damage, runs, tmp_path, capsys):
    folder = copy_of(runs, "crashed", tmp_path)
    damage(folder / CHECKPOINT)
    before = digest(folder)
    message = rejected(config(folder), capsys)
    assert message.startswith(f"regdrop: error in {folder / CHECKPOINT}:")
    assert f"trainer.resume={folder / PREVIOUS}" in message and "trainer.rerun=true" in message
    assert digest(folder) == before


def test_the_previous_checkpoint_resumes_to_the_same_final_weights(runs, tmp_path, capsys):
    folder = copy_of(runs, "crashed", tmp_path)
    truncate(folder / CHECKPOINT)
    assert load_checkpoint(folder / PREVIOUS)["state"]["step"] == 4  # one interval back
    summary = train(config(folder, f"trainer.resume={folder / PREVIOUS}"))
    assert "resumed at optimizer step 4" in capsys.readouterr().out
    assert summary["step"] == 8
    same_weights(runs["finished"], folder)
    assert len(list(folder.glob("checkpoint.set-aside-*.pt"))) == 1  # the damaged one, kept aside
    steps = [r["step"] for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
             if "train/loss" in r]
    assert steps == list(range(8))


def test_resume_at_a_file_that_is_not_a_checkpoint_is_named_and_leaves_no_folder(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a checkpoint\n")
    folder = tmp_path / "fresh" / "run"
    message = rejected(config(folder, f"trainer.resume={notes}"), capsys)
    assert message.startswith(f"regdrop: error in {notes}:") and "not" in message
    assert notes.read_text() == "not a checkpoint\n"
    assert not folder.exists()


def test_resume_at_a_missing_file_leaves_no_folder_behind(tmp_path, capsys):
    folder = tmp_path / "fresh" / "run"
    message = rejected(config(folder, f"trainer.resume={tmp_path / 'missing.pt'}"), capsys)
    assert message.startswith("regdrop: error in trainer.resume")
    assert not folder.exists()  # before: a folder holding only .lock


def test_a_torn_summary_of_a_finished_run_is_named_and_rerun_runs_it_again(runs, tmp_path, capsys):
    folder = copy_of(runs, "finished", tmp_path)
    truncate(folder / "metrics.json")
    before = digest(folder)
    message = rejected(config(folder), capsys)
    assert message.startswith(f"regdrop: error in {folder / 'metrics.json'}:") and "trainer.rerun=true" in message
    assert digest(folder) == before
    summary = train(config(folder, "trainer.rerun=true"))
    assert summary["step"] == 8 and json.loads((folder / "metrics.json").read_text())["step"] == 8
    [previous] = folder.glob("previous-*")
    assert digest(previous)["metrics.json"] == before["metrics.json"]  # the torn one, kept


def test_a_torn_config_of_a_run_folder_is_named_and_nothing_changes(runs, tmp_path, capsys):
    folder = copy_of(runs, "crashed", tmp_path)
    (folder / ".hydra" / "config.yaml").write_text("model: {name: lenet\n  width: [")
    before = digest(folder)
    message = rejected(config(folder), capsys)
    assert message.startswith(f"regdrop: error in {folder / '.hydra' / 'config.yaml'}:")
    assert "trainer.rerun=true" in message and "hydra.run.dir" in message
    assert digest(folder) == before


def test_a_garbage_line_in_what_the_checkpoint_covers_is_named_with_its_line(runs, tmp_path, capsys):
    folder = copy_of(runs, "crashed", tmp_path)
    metrics = folder / "metrics.jsonl"
    lines = metrics.read_bytes().splitlines(keepends=True)
    lines[2] = b"\x00\x17garbage" + b"x" * (len(lines[2]) - 10) + b"\n"
    metrics.write_bytes(b"".join(lines))
    before = digest(folder)
    message = rejected(config(folder), capsys)
    assert message.startswith(f"regdrop: error in {metrics}: line 3,")
    assert digest(folder) == before


def test_an_unreadable_failed_jobs_record_is_counted_not_fatal(tmp_path):
    (tmp_path / FAILED_JOBS).write_text("1.0 job 0 (seed=0): error in seed: bad\n\x00\x01torn li\nnot-a-stamp x\n")
    text = str(_rebuild_job_failed(str(tmp_path), "regdrop: error in seed: bad"))
    assert "1 job(s) of the sweep failed" in text and "job 0 (seed=0)" in text
    assert f"2 unreadable line(s) in {tmp_path / FAILED_JOBS}" in text


# -- metrics.jsonl and the checkpoint never disagree silently ------------------------------


def test_a_metrics_file_shorter_than_the_checkpoint_keeps_whole_lines_and_marks_the_gap(runs, tmp_path, capsys):
    folder = copy_of(runs, "crashed", tmp_path)
    metrics = folder / "metrics.jsonl"
    covered = load_checkpoint(folder / CHECKPOINT)["metrics_bytes"]
    data = metrics.read_bytes()[:covered]
    lines = data.splitlines(keepends=True)
    kept = b"".join(lines[:3])
    metrics.write_bytes(kept + lines[3][:7])  # a crash lost the tail, mid-line
    summary = train(config(folder))
    err = capsys.readouterr().err
    text = metrics.read_bytes()
    assert b"\x00" not in text  # the old resume padded the file with NUL bytes
    assert text.startswith(kept)
    records = [json.loads(line) for line in text.splitlines()]  # whole JSON lines only
    gaps = [r["gap"] for r in records if "gap" in r]
    assert gaps == [{"from_step": 3, "to_step": 5}]  # steps 0-2 kept, the checkpoint is at step 6
    assert f"{metrics} held less than the checkpoint covers" in " ".join(err.split())
    steps = [r["step"] for r in records if "train/loss" in r]
    assert steps == [0, 1, 2, 6, 7]
    assert json.loads((folder / "metrics.json").read_text())["metrics_gaps"] == [[3, 5]]
    assert summary["step"] == 8


# -- a finished run is read-only ------------------------------------------------------------


def test_resuming_a_finished_run_in_its_own_folder_is_refused_and_changes_nothing(runs, tmp_path, capsys):
    folder = copy_of(runs, "finished", tmp_path)
    before = digest(folder)
    for target in (folder, folder / CHECKPOINT):
        message = rejected(config(folder, f"trainer.resume={target}"), capsys)
        assert message.startswith("regdrop: error in trainer.resume:") and "trainer.rerun=true" in message
        assert digest(folder) == before  # before: metrics.json rewritten, an extra evaluation


# -- temporary files and folders -------------------------------------------------------------


def test_stale_temporary_files_of_dead_processes_are_removed_live_ones_kept(runs, tmp_path):
    folder = copy_of(runs, "crashed", tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = folder / f".{CHECKPOINT}.{dead.pid}.tmp"
    live = folder / f".{CHECKPOINT}.{os.getppid()}.tmp"
    stale.write_bytes(b"half a checkpoint")
    live.write_bytes(b"being written")
    train(config(folder))
    assert not stale.exists() and live.read_bytes() == b"being written"


def test_a_run_resumed_into_a_fresh_folder_writes_its_config_and_is_found_again(runs, tmp_path, capsys):
    from regdrop.report.runs import find_job_dirs

    source = copy_of(runs, "crashed", tmp_path)
    folder = tmp_path / "elsewhere" / "run"
    command = config(folder, f"trainer.resume={source / CHECKPOINT}")
    train(command)
    assert (folder / ".hydra" / "config.yaml").is_file() and (folder / "environment.json").is_file()
    assert find_job_dirs(tmp_path / "elsewhere") == [folder]
    capsys.readouterr()
    train(command)  # the same command again: found, finished, not rerun
    assert "holds a finished run of this config" in capsys.readouterr().out


# -- disk and permission faults --------------------------------------------------------------


def full_disk_on_call(n: int):
    """``torch.save`` that writes part of the file and then finds the disk full, from its
    ``n``-th call on (as a write to a full file system fails: ENOSPC, no file named)."""
    real = torch.save
    calls = {"n": 0}

    def save(payload, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= n:
            f.write(b"PK\x03\x04 the first bytes")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(payload, f, *args, **kwargs)

    return save


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_and_says_failed(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "run"
    monkeypatch.setattr(regdrop.checkpoint.torch, "save", full_disk_on_call(3))  # at step 4's second write
    cfg = config(folder)
    message = rejected(cfg, capsys)
    assert f"cannot write {folder / CHECKPOINT}" in message and "(ENOSPC)" in message
    assert f"The last checkpoint, {folder / CHECKPOINT}, is intact" in message
    assert load_checkpoint(folder / CHECKPOINT)["state"]["step"] == 4
    assert not list(folder.glob(".*.tmp"))
    status = json.loads((folder / "run.json").read_text())
    assert status["status"] == "failed" and "No space left on device" in status["reason"]
    before = digest(folder)
    monkeypatch.undo()  # space freed: the same command resumes
    assert digest(folder) == before
    assert train(cfg)["step"] == 8


class FullAfter:
    """A text file whose writes fail with ENOSPC after ``lines`` of them."""

    def __init__(self, file, lines: int) -> None:
        self.file, self.left = file, lines

    def write(self, text: str) -> int:
        self.left -= 1
        if self.left < 0:
            self.file.write(text[: len(text) // 2])  # part of a line reaches the disk
            self.file.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.file.write(text)

    def __getattr__(self, name):
        return getattr(self.file, name)


def test_a_full_disk_during_a_metrics_write_is_one_paragraph_and_the_run_resumes(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "run"
    real_open = builtins.open

    def opening(path, mode="r", *args, **kwargs):
        file = real_open(path, mode, *args, **kwargs)
        return FullAfter(file, 5) if str(path).endswith("metrics.jsonl") else file

    monkeypatch.setattr(regdrop.tracking, "open", opening, raising=False)
    cfg = config(folder)
    message = rejected(cfg, capsys)
    assert f"cannot write {folder / 'metrics.jsonl'}" in message and "(ENOSPC)" in message
    assert json.loads((folder / "run.json").read_text())["status"] == "failed"
    monkeypatch.undo()
    assert train(cfg)["step"] == 8
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == list(range(8))  # the torn line cut


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """``read_only(folder)``: make ``folder`` (a tmpfs mounted there) read-only. A real
    read-only mount where the machine allows it (root ignores chmod); otherwise every write
    below it fails with EROFS at the call that opens or makes a file."""
    mounted: list[Path] = []

    def mount(folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0:
            mounted.append(folder)
        return folder

    def make_read_only(folder: Path):
        """Returns the function that makes ``folder`` writable again."""
        if folder in mounted:
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
            return lambda: subprocess.run(["mount", "-o", "remount,rw", str(folder)], check=True)
        refuse = OSError(errno.EROFS, os.strerror(errno.EROFS))

        def below(path) -> bool:
            return Path(os.path.abspath(path)).is_relative_to(folder)

        real_open, real_mkdir = builtins.open, Path.mkdir

        def opening(path, mode="r", *args, **kwargs):
            if below(path) and any(c in mode for c in "wax+"):
                raise OSError(refuse.errno, refuse.strerror, str(path))
            return real_open(path, mode, *args, **kwargs)

        def mkdir(self, *args, **kwargs):
            if below(self) and not self.is_dir():
                raise OSError(refuse.errno, refuse.strerror, str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", opening)
        monkeypatch.setattr(Path, "mkdir", mkdir)
        return monkeypatch.undo

    yield mount, make_read_only
    monkeypatch.undo()
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=False)


def test_a_run_folder_made_read_only_is_one_paragraph_and_resumes_once_writable(runs, read_only, tmp_path, capsys):
    mount, make_read_only = read_only
    disk = mount(tmp_path / "disk")
    folder = disk / "crashed"
    shutil.copytree(runs["crashed"], folder)
    (folder / ".lock").unlink(missing_ok=True)
    before = digest(folder)
    make_writable = make_read_only(disk)
    message = rejected(config(folder), capsys)
    assert f"cannot write {folder}" in message and "(EROFS)" in message
    assert digest(folder) == before
    make_writable()  # the way forward: writable again, the same command resumes
    assert train(config(folder))["step"] == 8


def test_an_output_folder_on_a_read_only_file_system_is_one_paragraph(read_only, tmp_path, capsys):
    mount, make_read_only = read_only
    disk = mount(tmp_path / "disk")
    make_read_only(disk)
    message = rejected(config(disk / "runs" / "run"), capsys)
    assert f"cannot write {disk / 'runs'}" in message and "(EROFS)" in message
    assert not (disk / "runs").exists()


def test_a_run_folder_that_is_a_file_is_one_paragraph_exit_2_on_the_command_line(tmp_path):
    path = tmp_path / "results"
    path.write_text("my notes\n")
    result = run_cli(*TINY, *TINY_MODELS["lenet"], f"hydra.run.dir={path}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert str(path) in result.stderr and "(EEXIST)" in result.stderr
    assert path.read_text() == "my notes\n"


def test_a_run_folder_that_is_a_file_in_process(tmp_path, capsys):
    path = tmp_path / "results"
    path.write_text("my notes\n")
    message = rejected(config(path), capsys)
    assert f"cannot write {path}" in message and "(EEXIST)" in message
    assert path.read_text() == "my notes\n"


# -- signals ---------------------------------------------------------------------------------


def test_a_second_ctrl_c_during_the_checkpoint_waits_for_it(tmp_path, capfd, monkeypatch):
    folder = tmp_path / "run"
    real_step, real_save = regdrop.train.train_step, torch.save
    interrupted = {"save": False}

    def train_step(parts, batches, step, factor):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: checkpoint after step 2
        return real_step(parts, batches, step, factor)

    def save(payload, f, *args, **kwargs):
        if not interrupted["save"]:
            interrupted["save"] = True
            os.kill(os.getpid(), signal.SIGINT)  # the second one, inside the checkpoint write
        return real_save(payload, f, *args, **kwargs)

    monkeypatch.setattr(regdrop.train, "train_step", train_step)
    monkeypatch.setattr(regdrop.checkpoint.torch, "save", save)
    with pytest.raises(SystemExit) as stop:
        train(config(folder))
    err = capfd.readouterr().err
    assert stop.value.code == 130 and "Traceback" not in err
    assert "the checkpoint is being written; stopping as soon as it is written" in err
    assert load_checkpoint(folder / CHECKPOINT)["state"]["step"] == 2
    assert not list(folder.glob(".*.tmp"))
    assert json.loads((folder / "run.json").read_text())["status"] == "interrupted"


def test_a_second_ctrl_c_between_checkpoints_stops_at_once_without_a_traceback(runs, tmp_path, capfd,
                                                                                 monkeypatch):
    folder = copy_of(runs, "crashed", tmp_path)  # resumes at step 6
    real_step = regdrop.train.train_step
    before = (folder / CHECKPOINT).read_bytes()

    def train_step(parts, batches, step, factor):
        os.kill(os.getpid(), signal.SIGINT)  # two Ctrl-C inside one step
        os.kill(os.getpid(), signal.SIGINT)
        return real_step(parts, batches, step, factor)

    monkeypatch.setattr(regdrop.train, "train_step", train_step)
    with pytest.raises(SystemExit) as stop:
        train(config(folder))
    err = capfd.readouterr().err
    assert stop.value.code == 130 and "Traceback" not in err
    assert "abandoning the steps since the last checkpoint" in err
    assert (folder / CHECKPOINT).read_bytes() == before
    assert json.loads((folder / "run.json").read_text())["status"] == "interrupted"


def test_sighup_with_a_terminal_checkpoints_and_exits_3_like_sigterm(tmp_path):
    """A closed terminal (SIGHUP) leaves a resumable run: the checkpoint of the step under way
    and run.json `preempted`, as SIGTERM does (whose resume tests/test_resume.py checks)."""
    import pty

    folder = tmp_path / "run"
    args = [*RUN, f"hydra.run.dir={folder}", f"paths.data_dir={tmp_path}"]
    code = textwrap.dedent(f"""
        import os, signal, runpy, sys, regdrop.train as t
        step_fn = t.train_step
        def train_step(parts, batches, step, factor):
            if step == 5:
                os.kill(os.getpid(), signal.SIGHUP)
            return step_fn(parts, batches, step, factor)
        t.train_step = train_step
        sys.argv = ["train.py", *{args!r}]
        runpy.run_path({str(ROOT / "train.py")!r}, run_name="__main__")
    """)
    terminal, other_end = pty.openpty()
    try:
        stopped = subprocess.run([sys.executable, "-c", code], cwd=ROOT, stdin=other_end,
                                 capture_output=True, text=True, timeout=300)
    finally:
        os.close(terminal)
        os.close(other_end)
    assert stopped.returncode == 3, stopped.stderr[-3000:]
    assert "SIGHUP" in stopped.stderr and "Traceback" not in stopped.stderr
    assert load_checkpoint(folder / CHECKPOINT)["state"]["step"] == 6
    assert json.loads((folder / "run.json").read_text())["status"] == "preempted"
