"""The report command: real multiruns of the real trainer read back into a table, and the
reader's rules (grouping, resumed logs, run status, the table section) on folders written here."""

from __future__ import annotations

import json
import shutil
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from regdrop.errors import ConfigError
from regdrop.report import check_table, main, read_metrics_log, write_report
from regdrop.report.runs import (
    FAILED_EARLY,
    FINISHED,
    KILLED,
    RUNNING,
    STOPPED,
    find_sweeps,
    load_job,
    load_jobs,
    missing_jobs,
    sweep_grid,
)
from regdrop.report.table import TableSpec, build_layout, swept_keys
from tests.conftest import ROOT, TINY, run_cli

LENET = ["model=lenet", "model.width=0.125"]


def report_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m regdrop.report ARGS`, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "regdrop.report", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def table_line(report: str, label: str) -> str:
    """The main table's line whose first cell is ``label``."""
    table = report.split("## Table", 1)[1].split("## Every cell", 1)[0]
    return next(line for line in table.splitlines() if line.startswith(f"| {label} |"))


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_run_json(job: Path, status: str, *, pid: int, host: str | None = None,
                   updated: datetime | None = None) -> None:
    now = datetime.now(timezone.utc)
    (job / "run.json").write_text(json.dumps({
        "status": status, "pid": pid, "host": host or socket.gethostname(),
        "started": (now - timedelta(minutes=5)).isoformat(),
        "updated": (updated or now).isoformat()}))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """The acceptance multirun: LeNet, standard vs gyro dropout, seeds 0 and 1 (4 jobs)."""
    root = tmp_path_factory.mktemp("report") / "sweep"
    result = run_cli("-m", *LENET, "dropout=standard,gyro", "seed=0,1", *TINY,
                     f"hydra.sweep.dir={root}")
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def finished_values(root: Path, dropout: str, key: str) -> list[float]:
    values = []
    for config in root.rglob(".hydra/config.yaml"):
        if yaml.safe_load(config.read_text())["dropout"]["name"] == dropout:
            values.append(json.loads((config.parent.parent / "metrics.json").read_text())[key])
    return values


# -- acceptance: a real multirun, a killed job, a failed job, an empty folder ----------------


def test_report_of_a_real_multirun_has_mean_std_n_and_figures(sweep, tmp_path):
    root = tmp_path / "sweep"
    shutil.copytree(sweep, root)
    result = report_cli(str(root))
    assert result.returncode == 0, result.stderr
    report = (root / "report.md").read_text()
    for dropout in ("standard", "gyro"):
        best = [100 * v for v in finished_values(root, dropout, "best/test_acc")]
        assert len(best) == 2
        expected = f"{statistics.fmean(best):.2f} ± {statistics.stdev(best):.2f} (n=2)"
        assert expected in table_line(report, dropout)
        loss = finished_values(root, dropout, "train/loss")
        assert f"{statistics.fmean(loss):.4f} ± {statistics.stdev(loss):.4f}" in report
    assert "Every job finished" in report
    pngs = sorted((root / "figures").glob("*.png"))
    assert {p.name for p in pngs} >= {"test_acc.png", "train_loss.png", "drop_rate.png",
                                       "loss_vs_steps.png"}
    assert all(p.stat().st_size > 5000 and p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    assert "![Test accuracy](figures/test_acc.png)" in report


def test_empty_folder_exits_non_zero_with_one_line(tmp_path):
    result = report_cli(str(tmp_path))
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert "no runs" in result.stderr and str(tmp_path) in result.stderr
    assert not (tmp_path / "report.md").exists()
    missing = report_cli(str(tmp_path / "nowhere"))
    assert missing.returncode != 0 and len(missing.stderr.strip().splitlines()) == 1


def test_a_killed_job_and_a_failed_job_are_marked_in_their_cells(tmp_path):
    root = tmp_path / "sweep"
    # tau=0 is a bad value: that job fails before training; the other one trains.
    result = run_cli("-m", *LENET, "dropout=gyro", "dropout.tau=0,4", "seed=0", *TINY,
                     f"hydra.sweep.dir={root}")
    assert result.returncode != 0  # Hydra reports the failed job
    tau4 = next(c.parent.parent for c in root.rglob(".hydra/config.yaml")
                if yaml.safe_load(c.read_text())["dropout"]["tau"] == 4)
    (tau4 / "metrics.json").unlink()  # killed before its summary was written
    write_run_json(tau4, "running", pid=dead_pid())

    assert main([str(root)]) == 0
    report = (root / "report.md").read_text()
    # The rejected job has no folder (or one without metrics); the sweep's multirun.yaml
    # names it and failed_jobs.txt holds its error: its cell says so.
    assert "(1 failed before training)" in table_line(report, "0")
    assert "(1 killed)" in table_line(report, "4")
    problems = report.split("## Missing, failed, killed or still running", 1)[1]
    assert "| 4 | 0 | killed |" in problems and "is gone" in problems
    assert "| 0 | 0 | failed before training |" in problems


def test_a_job_the_sweep_launched_without_a_folder_is_named_missing(sweep, tmp_path):
    root = tmp_path / "sweep"
    shutil.copytree(sweep, root)
    gone = next(c.parent.parent for c in root.rglob(".hydra/config.yaml")
                if "dropout=gyro" in c.parent.joinpath("overrides.yaml").read_text()
                and "seed=1" in c.parent.joinpath("overrides.yaml").read_text())
    shutil.rmtree(gone)
    report_file = write_report([root]).path
    report = report_file.read_text()
    assert "(n=1) — 1 missing" in table_line(report, "gyro")
    assert "(n=2)" in table_line(report, "standard")
    assert "| gyro | 1 | missing |" in report


def test_table_section_sets_layout_reference_and_error(sweep, tmp_path):
    root = tmp_path / "sweep"
    shutil.copytree(sweep, root)
    table = {"title": "Gyro vs dropout", "source": "Lee et al., MLSys 2022, Table 2",
             "rows": ["dropout.name"], "columns": ["data.name"], "metric": "best/test_acc",
             "as_error": True,
             "reference": {"standard": {"synthetic": 22.1}, "gyro": {"synthetic": 21.0},
                           "spatial": {"synthetic": 30.0}}}
    for config in root.rglob(".hydra/config.yaml"):
        data = yaml.safe_load(config.read_text())
        data["table"] = table
        config.write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path / "elsewhere"
    report = write_report([root], out).path.read_text()
    assert report.startswith("# Gyro vs dropout") and "Lee et al., MLSys 2022" in report
    assert "| dropout.name | synthetic: ours, best test error (%) | synthetic: paper |" in report
    errors = [100 - 100 * v for v in finished_values(root, "gyro", "best/test_acc")]
    line = table_line(report, "gyro")
    assert f"{statistics.fmean(errors):.2f} ± {statistics.stdev(errors):.2f} (n=2)" in line
    assert "| 21 |" in line
    # The paper's order: standard first, as the reference lists it.
    assert report.index("| standard |") < report.index("| gyro |")
    assert "`spatial`, column `synthetic` matches no cell" in report
    assert (out / "report.md").exists() and (out / "figures" / "test_acc.png").exists()


# -- the reader's rules, on folders written here ----------------------------------------------


def write_job(path: Path, overrides: list[str], config: dict, *, summary: dict | None = None,
              records: list[dict] | None = None) -> Path:
    """A job folder in the trainer's format: .hydra/config.yaml and overrides.yaml, and the
    metrics files when given."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if records is not None:
        (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary is not None:
        (path / "metrics.json").write_text(json.dumps(summary))
    return path


def finished_job(path: Path, overrides: list[str], config: dict, acc: float,
                 loss: float = 1.0, epochs: int = 2) -> Path:
    records = []
    for epoch in range(1, epochs + 1):
        for step in range((epoch - 1) * 2, epoch * 2):
            records.append({"step": step, "epoch": epoch, "train/loss": loss + epochs - epoch,
                            "train/acc": 0.5, "lr": 0.1, "train/drop_rate": 0.5,
                            "samples_per_s": 100.0})
        records.append({"step": epoch * 2, "epoch": epoch, "test/loss": 1.0, "test/acc": acc,
                        "best/test_acc": acc, "train/epoch_loss": loss, "train/epoch_acc": 0.5})
    summary = {"train/loss": loss, "test/loss": 1.0, "test/acc": acc, "best/test_acc": acc,
               "epoch": epochs, "step": 2 * epochs, "wall_time_s": 10.0 * epochs,
               "train_time_s": 8.0 * epochs, "samples_per_s": 100.0}
    return write_job(path, overrides, config, summary=summary, records=records)


def config_of(method: str, p: float, seed: int, **extra) -> dict:
    return {"seed": seed, "dropout": {"name": method, "p": p}, "data": {"name": "synthetic"},
            "trainer": {"device": "cpu"}, **extra}


def test_resumed_log_keeps_the_last_record_of_each_step_and_drops_the_abandoned_tail(tmp_path):
    def train(step, loss):
        return {"step": step, "epoch": 1 + step // 4, "train/loss": loss}

    def evaluation(step, acc):
        return {"step": step, "epoch": step // 4, "test/loss": 1.0, "test/acc": acc}

    lines = [train(s, 9.0) for s in range(4)] + [evaluation(4, 0.1)] + \
        [train(s, 9.0) for s in range(4, 7)]  # first attempt: reached step 6, then killed
    lines += [train(s, 1.0) for s in range(4, 6)]  # resumed from the step-4 checkpoint
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 6, "tra')
    steps, evals, bad = read_metrics_log(path)
    assert [r["step"] for r in steps] == [0, 1, 2, 3, 4, 5]  # step 6 of the old attempt gone
    assert [r["train/loss"] for r in steps] == [9.0] * 4 + [1.0, 1.0]  # the last wins
    assert [r["step"] for r in evals] == [4] and bad == 1  # the torn line is counted

    # A repeated evaluation of the same step: the later one wins, and it drops the old
    # attempt's steps past it.
    again = lines + [evaluation(4, 0.3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in again))
    steps, evals, bad = read_metrics_log(path)
    assert [r["test/acc"] for r in evals] == [0.3] and [r["step"] for r in steps] == [0, 1, 2, 3]
    assert bad == 0


def test_jobs_group_by_swept_keys_with_seeds_averaged(tmp_path):
    for i, (method, p, seed, acc) in enumerate([
        ("standard", 0.5, 0, 0.80), ("standard", 0.5, 1, 0.82), ("standard", 0.3, 0, 0.70),
        ("gyro", 0.5, 0, 0.90), ("gyro", 0.5, 1, 0.86), ("gyro", 0.5, 2, 0.88),
    ]):
        finished_job(tmp_path / str(i), [f"dropout={method}", f"dropout.p={p}", f"seed={seed}",
                                         "trainer.device=cpu"], config_of(method, p, seed), acc)
    # Another device is not another configuration.
    finished_job(tmp_path / "6", ["dropout=gyro", "dropout.p=0.5", "seed=3",
                                  "trainer.device=cuda"], config_of("gyro", 0.5, 3), 0.84)
    jobs = load_jobs([tmp_path])
    assert swept_keys(jobs) == ["dropout", "dropout.p"]
    layout = build_layout(jobs, TableSpec())
    assert layout.rows == ["gyro / 0.5", "standard / 0.3", "standard / 0.5"]
    gyro = layout.cells[("gyro / 0.5", "all")]
    assert sorted(job.seed for job in gyro.finished) == [0, 1, 2, 3]
    assert statistics.fmean(gyro.values("best/test_acc")) == pytest.approx(0.87)
    assert gyro.per_epoch("wall_time_s") == [10.0] * 4

    # rows: [dropout.name] alone would merge p=0.3 and p=0.5: the row labels gain dropout.p.
    layout = build_layout(jobs, TableSpec(rows=["dropout.name"]))
    assert layout.extra_keys == ["dropout.p"]
    assert set(layout.rows) == {"gyro / dropout.p=0.5", "standard / dropout.p=0.3",
                                "standard / dropout.p=0.5"}


def test_a_seed_finished_twice_counts_once(tmp_path):
    overrides = ["dropout=standard", "seed=0"]
    finished_job(tmp_path / "a" / "0", overrides, config_of("standard", 0.5, 0), 0.5)
    time.sleep(0.05)
    finished_job(tmp_path / "b" / "0", overrides, config_of("standard", 0.5, 0), 0.7)
    finished_job(tmp_path / "b" / "1", ["dropout=standard", "seed=1"],
                 config_of("standard", 0.5, 1), 0.9)
    layout = build_layout(load_jobs([tmp_path / "a", tmp_path / "b"]), TableSpec())
    (cell,) = layout.cells.values()
    assert sorted(cell.values("best/test_acc")) == [0.7, 0.9]  # the newer seed-0 run counts
    assert [job.path.parent.name for job in cell.duplicates] == ["a"]


def test_status_from_run_json_pid_and_staleness(tmp_path):
    config = config_of("standard", 0.5, 0)
    records = [{"step": 0, "epoch": 1, "train/loss": 2.0}]
    live = write_job(tmp_path / "live", ["seed=0"], config, records=records)
    write_run_json(live, "running", pid=subprocess.os.getpid())
    dead = write_job(tmp_path / "dead", ["seed=0"], config, records=records)
    write_run_json(dead, "running", pid=dead_pid())
    elsewhere = write_job(tmp_path / "elsewhere", ["seed=0"], config, records=records)
    write_run_json(elsewhere, "running", pid=1, host="another-host")
    stale = write_job(tmp_path / "stale", ["seed=0"], config, records=records)
    write_run_json(stale, "running", pid=1, host="another-host",
                   updated=datetime.now(timezone.utc) - timedelta(hours=2))
    old = time.time() - 7200
    subprocess.os.utime(stale / "metrics.jsonl", (old, old))
    diverged = write_job(tmp_path / "diverged", ["seed=0"], config, records=records)
    write_run_json(diverged, "diverged", pid=1)
    interrupted = write_job(tmp_path / "interrupted", ["seed=0"], config, records=records)
    write_run_json(interrupted, "interrupted", pid=1)
    no_run_json = write_job(tmp_path / "no_run_json", ["seed=0"], config, records=records)
    subprocess.os.utime(no_run_json / "metrics.jsonl", (old, old))
    early = write_job(tmp_path / "early", ["seed=0"], config)
    done = finished_job(tmp_path / "done", ["seed=0"], config, 0.5)

    status = {p.name: load_job(p).status for p in
              (live, dead, elsewhere, stale, diverged, interrupted, no_run_json, early, done)}
    assert status == {"live": RUNNING, "dead": KILLED, "elsewhere": RUNNING, "stale": KILLED,
                      "diverged": "diverged", "interrupted": "interrupted",
                      "no_run_json": STOPPED, "early": FAILED_EARLY, "done": FINISHED}
    assert load_job(no_run_json, stale_s=3 * 3600).status == RUNNING


def test_cells_report_their_problems_and_only_finished_jobs_count(tmp_path):
    config = config_of("standard", 0.5, 0)
    finished_job(tmp_path / "0", ["dropout=standard", "seed=0"], config, 0.6)
    write_job(tmp_path / "1", ["dropout=standard", "seed=1"], config_of("standard", 0.5, 1))
    dead = write_job(tmp_path / "2", ["dropout=gyro", "seed=0"], config_of("gyro", 0.5, 0),
                     records=[{"step": 0, "epoch": 1, "train/loss": 2.0}])
    write_run_json(dead, "running", pid=dead_pid())
    report = write_report([tmp_path], figures=False)
    text = report.path.read_text()
    assert "60.00 (n=1) — 1 failed before training" in table_line(text, "standard")
    assert "— (1 killed)" in table_line(text, "gyro")
    assert report.figures == []


def test_steps_to_a_loss_target_use_a_moving_mean_of_step_losses(tmp_path):
    # Step losses 3, 3, 3, 1, 1, 1, 0.2, 0.2 (one epoch of 8 steps): the moving mean of 3
    # steps is <= 1.5 first after step 5 (mean of steps 3-5 = 1.0; steps 2-4: 1.67), i.e.
    # after 6 steps. The epoch mean (1.575) never reaches it; a single step does after 4.
    losses = [3.0, 3.0, 3.0, 1.0, 1.0, 1.0, 0.2, 0.2]
    records = [{"step": s, "epoch": 1, "train/loss": loss} for s, loss in enumerate(losses)]
    summary = {"train/loss": 1.575, "test/acc": 0.5, "best/test_acc": 0.5, "epoch": 1}
    table = {"loss_target": 1.5, "loss_window": 3}
    write_job(tmp_path / "0", ["seed=0"], config_of("standard", 0.5, 0, table=table),
              summary=summary, records=records)
    write_job(tmp_path / "1", ["seed=1"], config_of("standard", 0.5, 1, table=table),
              summary=summary, records=[{**r, "train/loss": r["train/loss"] + 2} for r in records])
    spec = TableSpec.from_section(table)
    layout = build_layout(load_jobs([tmp_path]), spec)
    (cell,) = layout.cells.values()
    assert sorted(cell.steps_to_loss(1.5, spec.loss_window), key=str) == [6.0, None]
    assert cell.steps_to_loss(1.5, 1)[0] == 4.0  # one step at a time: after 4 steps
    assert cell.steps_to_loss(1.5, 9)[0] is None  # a window longer than the run
    report = write_report([tmp_path], figures=False)
    assert "steps to train loss ≤ 1.5 (mean of 3 steps)" in report.path.read_text()
    (data,) = json.loads(report.json_path.read_text())["cells"]
    assert data["steps_to_loss"]["values"] == [6.0] and data["steps_to_loss"]["never"] == 1


def test_sweep_grid_expands_the_command_line_and_sweeper_params(tmp_path):
    (tmp_path / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {
        "overrides": {"task": ["model=lenet", "dropout=standard,gyro", "seed=range(0,2)"]},
        "sweeper": {"params": {"dropout.p": "0.1,0.5", "seed": "7,8,9"}}}}))
    grid = sweep_grid(tmp_path / "multirun.yaml")
    assert len(grid.jobs) == 2 * 2 * 2  # the command line's seeds win over params'
    assert {"dropout.p": "0.1", "model": "lenet", "dropout": "gyro", "seed": "1"} in grid.jobs
    assert set(grid.swept) == {"dropout.p", "dropout", "seed"}


def test_missing_jobs_match_by_result_overrides_and_a_bad_multirun_yaml_is_a_note(tmp_path):
    (tmp_path / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {
        "overrides": {"task": ["dropout=standard,gyro", "seed=0,1"]}}}))
    # A resumed job carries trainer.resume: still the job the sweep launched.
    finished_job(tmp_path / "0", ["dropout=standard", "seed=0", "trainer.resume=last.pt"],
                 config_of("standard", 0.5, 0), 0.5)
    finished_job(tmp_path / "1", ["dropout=standard", "seed=1"], config_of("standard", 0.5, 1),
                 0.5)
    finished_job(tmp_path / "2", ["dropout=gyro", "seed=0"], config_of("gyro", 0.5, 0), 0.5)
    jobs = load_jobs([tmp_path])
    missing = missing_jobs(find_sweeps([tmp_path]), jobs)
    assert [expected.overrides for expected in missing] == [{"dropout": "gyro", "seed": "1"}]
    assert missing[0].status == "missing"
    report = write_report([tmp_path], figures=False).path.read_text()
    assert "(n=1) — 1 missing" in table_line(report, "gyro")

    # The sweep recorded the job as failed (a rejected config writes no folder).
    (tmp_path / "failed_jobs.txt").write_text(
        "1796013105.472 job 3 (dropout=gyro seed=1): error in dropout.tau: tau must be a "
        "positive integer, got 0\n")
    report = write_report([tmp_path], figures=False).path.read_text()
    assert "(n=1) — 1 failed before training" in table_line(report, "gyro")
    assert "| gyro | 1 | failed before training |" in report and "got 0" in report

    (tmp_path / "multirun.yaml").write_text("hydra: {overrides: {task: ['dropout=(']}}")
    report = write_report([tmp_path], figures=False).path.read_text()
    assert "could not be read" in report and "(n=1)" in table_line(report, "gyro")


@pytest.mark.parametrize("section, key", [
    ("not a mapping", "table"),
    ({"rows": ["dropout.name"], "colums": []}, "table.colums"),
    ({"rows": "dropout.name"}, "table.rows"),
    ({"rows": []}, "table.rows"),
    ({"rows": ["dropout name"]}, "table.rows"),
    ({"rows": ["dropout.name", "dropout.name"]}, "table.rows"),
    ({"rows": ["dropout.name"], "columns": ["dropout.name"]}, "table.columns"),
    ({"rows": ["dropout.name"], "metric": "best/acc"}, "table.metric"),
    ({"rows": ["dropout.name"], "as_error": "yes"}, "table.as_error"),
    ({"rows": ["dropout.name"], "metric": "train/loss", "as_error": True}, "table.as_error"),
    ({"rows": ["dropout.name"], "reference": [77.9]}, "table.reference"),
    ({"rows": ["dropout.name"], "reference": {"gyro": 79.0}}, "table.reference.gyro"),
    ({"rows": ["dropout.name"], "reference": {"gyro": {"cifar10": "79%"}}},
     "table.reference.gyro.cifar10"),
    ({"rows": ["dropout.name"], "title": 3}, "table.title"),
    ({"rows": ["dropout.name"], "loss_target": 0}, "table.loss_target"),
    ({"rows": ["dropout.name"], "loss_window": 0}, "table.loss_window"),
    ({"rows": ["dropout.name"], "baseline": ["none"]}, "table.baseline"),
    ({"rows": ["dropout.name"], "regime": "overfitting"}, "table.regime"),
    ({"rows": ["dropout.name"], "regime": {"needs": "overfit", "min_gap": 0.05}},
     "table.regime.needs"),
    ({"rows": ["dropout.name"], "regime": {"needs": "overfitting", "max_gap": 0.05}},
     "table.regime.max_gap"),
    ({"rows": ["dropout.name"], "regime": {"needs": "overfitting", "min_gap": 5}},
     "table.regime.min_gap"),
    ({"rows": ["dropout.name"], "regime": [{"needs": "overfitting", "min_gap": 0.05},
                                           {"needs": "underfitting", "max_gap": 0.02}]},
     "table.regime[0].column"),
    ({"rows": ["dropout.name"], "claims": {"better": "gyro", "than": "standard"}},
     "table.claims"),
    ({"rows": ["dropout.name"], "claims": [{"better": "gyro"}]}, "table.claims[0].than"),
    ({"rows": ["dropout.name"], "claims": [{"better": "gyro", "than": "gyro"}]},
     "table.claims[0].than"),
    ({"rows": ["dropout.name"], "claims": [{"better": "gyro", "than": "none", "metric": "acc"}]},
     "table.claims[0].metric"),
    ({"rows": ["dropout.name"], "claims": [{"better": "gyro", "than": "none", "by": 1}]},
     "table.claims[0].by"),
])
def test_check_table_names_the_bad_key(section, key):
    with pytest.raises(ConfigError) as err:
        check_table(section)
    assert err.value.key == key


def test_check_table_accepts_the_documented_sections():
    from omegaconf import OmegaConf

    check_table(None)
    section = {"title": "Gyro dropout vs dropout, LeNet-like, CIFAR-10",
               "source": "Lee et al., MLSys 2022, Table 2", "rows": ["dropout.name"],
               "columns": ["data.name"], "metric": "best/test_acc", "as_error": False,
               "reference": {"standard": {"cifar10": 77.9}, "gyro": {"cifar10": 79.0}}}
    check_table(section)
    check_table(OmegaConf.create(section))  # as the trainer's config holds it
    check_table({"rows": ["dropout.name"], "columns": [], "metric": "test/acc",
                 "as_error": True, "loss_target": 0.5, "loss_window": 20})
    with_claims = {"rows": ["dropout.name"], "columns": ["data.subset"], "baseline": "none",
                   "regime": [{"needs": "underfitting", "max_gap": 0.02, "column": 12000},
                              {"needs": "overfitting", "min_gap": 0.05, "column": "500"}],
                   "claims": [{"better": "gyro / 256 / 16", "than": "standard",
                               "metric": "test/loss", "column": "500", "paper": "gyro wins"}]}
    check_table(OmegaConf.create(with_claims))
    spec = TableSpec.from_section(with_claims)
    assert [(r.needs, r.gap, r.column) for r in spec.regime] == [
        ("underfitting", 0.02, "12000"), ("overfitting", 0.05, "500")]
    assert spec.claims[0].column == "500" and not spec.claims[0].higher_is_better
    assert TableSpec.from_section(section).reference == {"standard": {"cifar10": 77.9},
                                                        "gyro": {"cifar10": 79.0}}


def test_diagnostics_records_become_gdv_and_gde_curves_and_never_step_records(tmp_path):
    jobs = []
    for seed in (0, 1):
        job = finished_job(tmp_path / "sweep" / str(seed), ["dropout=standard", f"seed={seed}"],
                           config_of("standard", 0.5, seed), 0.6)
        with open(job / "metrics.jsonl", "a") as f:
            for step in (0, 2):
                f.write(json.dumps({"step": step, "epoch": 1, "diag/gdv": 0.1 * (step + 1 + seed),
                                    "diag/gde": 0.2}) + "\n")
        jobs.append(job)
    train, evals, bad = read_metrics_log(jobs[0] / "metrics.jsonl")
    assert bad == 0 and all("diag/gdv" not in r for r in train + evals)
    assert [r["step"] for r in train] == [0, 1, 2, 3]
    write_report([tmp_path / "sweep"])
    for name in ("gdv.png", "gde.png"):
        [figure] = (tmp_path / "sweep").rglob(name)
        assert figure.stat().st_size > 1000


def test_a_figure_has_a_panel_only_for_the_columns_with_something_to_draw(tmp_path):
    """Diagnostics on in one column only (mini table 4): its GDV figure has one panel, the
    test-accuracy figure one per column."""
    from matplotlib.image import imread

    table = {"title": "Two columns", "rows": ["dropout.name"], "columns": ["data.name"], "metric": "test/acc"}
    for data in ("small", "large"):
        for seed in (0, 1):
            config = config_of("standard", 0.5, seed, table=table)
            config["data"] = {"name": data}
            job = finished_job(tmp_path / "sweep" / f"{data}{seed}",
                               ["dropout=standard", f"data={data}", f"seed={seed}"], config, 0.6)
            if data == "small":
                with open(job / "metrics.jsonl", "a") as f:
                    for step in (0, 2):
                        f.write(json.dumps({"step": step, "epoch": 1, "diag/gdv": 0.5,
                                            "diag/gde": 0.2}) + "\n")
    write_report([tmp_path / "sweep"])
    figures = tmp_path / "sweep" / "figures"
    widths = {name: imread(figures / name).shape[1] for name in ("gdv.png", "test_acc.png")}
    assert widths["test_acc.png"] == 2 * widths["gdv.png"]


# -- evidence: report.json, seeds.csv, claims and regime on a real multirun ------------------


def test_report_json_csv_claims_and_regime_of_a_real_multirun(sweep, tmp_path):
    import csv

    from scipy import stats as scipy_stats

    root = tmp_path / "sweep"
    shutil.copytree(sweep, root)
    table = {"rows": ["dropout.name"], "baseline": "standard",
             "regime": {"needs": "underfitting", "max_gap": 1.0},
             "claims": [{"better": "gyro", "than": "standard", "metric": "best/test_acc",
                         "paper": "gyro >= dropout"}]}
    for config in root.rglob(".hydra/config.yaml"):
        data = yaml.safe_load(config.read_text())
        data["table"] = table
        config.write_text(yaml.safe_dump(data, sort_keys=False))
    assert main([str(root), "--no-figures"]) == 0
    data = json.loads((root / "report.json").read_text())
    cells = {c["row"]: c for c in data["cells"]}
    summaries = {}
    for config in root.rglob(".hydra/config.yaml"):
        job = config.parent.parent
        summaries[(yaml.safe_load(config.read_text())["dropout"]["name"],
                   str(yaml.safe_load(config.read_text())["seed"]))] = \
            json.loads((job / "metrics.json").read_text())
    for dropout in ("standard", "gyro"):
        best = [100 * summaries[(dropout, s)]["best/test_acc"] for s in ("0", "1")]
        got = cells[dropout]["metrics"]["best/test_acc"]
        assert got["n"] == 2 and sorted(got["values"]) == pytest.approx(sorted(best))
        half = scipy_stats.t.ppf(0.975, 1) * statistics.stdev(best) / 2 ** 0.5
        assert got["ci_low"] == pytest.approx(statistics.fmean(best) - half)
        # Training accuracy as logged: test acc + the summary's gap.
        train = [100 * (summaries[(dropout, s)]["test/acc"] + summaries[(dropout, s)]["gap/acc"])
                 for s in ("0", "1")]
        assert sorted(cells[dropout]["metrics"]["train/acc"]["values"]) == pytest.approx(
            sorted(train))
    (claim,) = data["claims"]
    assert claim["test"] == "paired t (by seed)" and claim["paired_seeds"] == ["0", "1"]
    gyro = [100 * summaries[("gyro", s)]["best/test_acc"] for s in ("0", "1")]
    standard = [100 * summaries[("standard", s)]["best/test_acc"] for s in ("0", "1")]
    assert claim["difference"] == pytest.approx(statistics.fmean(gyro)
                                                - statistics.fmean(standard))
    if len({g - s for g, s in zip(gyro, standard, strict=True)}) > 1:
        assert claim["p_value"] == pytest.approx(scipy_stats.ttest_rel(gyro, standard).pvalue)
    assert claim["verdict"] in ("held", "contradicted", "inconclusive")
    (regime,) = data["regime"]
    assert regime["in_regime"] is True and regime["baseline_gap_percent"]["n"] == 2
    report = (root / "report.md").read_text()
    assert "## Claims" in report and "gyro > standard" in report and "paired" in report
    assert "## Regime: training beside test" in report and "**in the regime**" in report
    assert "dropout on" in report or "dropout (and every other" in report
    with open(root / "seeds.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"finished"}
    for row in rows:
        summary = summaries[(row["row"], row["seed"])]
        assert float(row["best/test_acc"]) == summary["best/test_acc"]
        assert float(row["train/loss"]) == summary["train/loss"]


# -- the report survives bad jobs, and a folder it cannot write -------------------------------


def test_unreadable_job_files_are_marked_cells_not_an_abort(tmp_path):
    for seed in (0, 1):
        for method in ("standard", "gyro"):
            finished_job(tmp_path / f"{method}{seed}", [f"dropout={method}", f"seed={seed}"],
                         config_of(method, 0.5, seed), 0.6 + 0.1 * seed)
    (tmp_path / "gyro1" / ".hydra" / "config.yaml").write_text("seed: 1\ndropout: {name: gy")
    torn = tmp_path / "standard1" / "metrics.json"
    torn.write_bytes(torn.read_bytes()[:20])
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    result = report_cli(str(tmp_path), "--no-figures")
    assert result.returncode == 0, result.stderr
    report = (tmp_path / "report.md").read_text()
    assert "(n=1) — 1 unreadable" in table_line(report, "gyro")
    assert "(n=1) — 1 unreadable" in table_line(report, "standard")
    problems = report.split("## Missing, failed, killed or still running", 1)[1]
    assert "config.yaml unreadable" in problems and "metrics.json unreadable" in problems
    assert all(p.read_bytes() == data for p, data in before.items())  # nothing rewritten
    seeds = (tmp_path / "seeds.csv").read_text()
    assert seeds.count(",unreadable,") == 2


def test_a_read_only_sweep_folder_is_one_paragraph_suggesting_out(tmp_path, monkeypatch,
                                                                    capsys):
    import errno
    import tempfile

    root = tmp_path / "sweep"
    for seed in (0, 1):
        finished_job(root / str(seed), ["dropout=standard", f"seed={seed}"],
                     config_of("standard", 0.5, seed), 0.5)
    (root / "report.md").write_text("an earlier report\n")
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    real = tempfile.NamedTemporaryFile

    def read_only(*args, dir=None, **kwargs):  # noqa: A002 - tempfile's own keyword
        if dir is not None and Path(dir) == root:
            raise OSError(errno.EROFS, "Read-only file system", str(root))
        return real(*args, dir=dir, **kwargs)

    # Tests run as root, for whom chmod does not stop a write: the file system's refusal,
    # at the report's first write into the folder.
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    assert main([str(root), "--no-figures"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "EROFS" in err and str(root) in err and "--out DIR" in err
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    # The way forward works: --out elsewhere.
    assert main([str(root), "--no-figures", "--out", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "report.json").exists()
    assert (root / "report.md").read_text() == "an earlier report\n"


def test_a_gap_record_of_a_resumed_run_is_not_an_unreadable_line(tmp_path):
    # A resume whose checkpoint covered more than metrics.jsonl held marks the lost steps
    # with a gap record (no "step" key): the report skips it instead of counting it as bad.
    log = tmp_path / "metrics.jsonl"
    lines = [{"step": 0, "epoch": 1, "train/loss": 2.3, "train/acc": 0.1},
             {"gap": {"from_step": 1, "to_step": 4}, "missing_bytes": 300},
             {"step": 5, "epoch": 1, "train/loss": 2.1, "train/acc": 0.2},
             "{torn"]
    log.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    train, evals, bad = read_metrics_log(log)
    assert [r["step"] for r in train] == [0, 5] and evals == []
    assert bad == 1  # the torn line only
