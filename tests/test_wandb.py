"""wandb dashboards that read like the table, checked on the offline files a run leaves.

One real 2x2 sigma x tau multirun (four jobs, offline wandb, ``logger.log_checkpoints=best``)
is shared by the assertions; one of its jobs is then resumed by launching the same command
again. The ``.wandb`` files are read record by record with wandb's own protobuf messages
(`wandb.proto.wandb_internal_pb2.Record`): wandb 0.31 ships no Python reader of its log
format, whose framing (LevelDB's log: 32 KiB blocks of CRC, length, type) is read here.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from filelock import FileLock

from tests.conftest import TINY, TINY_MODELS, run_cli

SWEEP = ["-m", *[o for o in TINY if o != "logger=none"], *TINY_MODELS["lenet"], "logger=wandb",
         "dropout=gyro", "dropout.sigma=8,16", "dropout.tau=2,4", "trainer.keep_best=true",
         "logger.log_checkpoints=best"]
BLOCK = 32 * 1024  # wandb's log format: LevelDB's record log


def read_records(path: Path):
    """Every record of a ``.wandb`` file, as `wandb_internal_pb2.Record` messages."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb log"
    position, pending = 7, b""
    while position + 7 <= len(data):
        left = BLOCK - position % BLOCK
        if left < 7:  # the block's tail is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0 and length == 0:
            position += left
            continue
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # full/first, middle/last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


@dataclass
class OfflineRun:
    """What the offline files of one run folder's wandb runs hold."""

    runs: list = field(default_factory=list)  # the RunRecord of each start (a resume adds one)
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)  # name or glob -> MetricRecord
    summary: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    artifacts: list = field(default_factory=list)


def _key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def offline_run(folder: Path) -> OfflineRun:
    files = sorted(folder.glob("wandb/offline-run-*/*.wandb"))
    assert files, f"no offline wandb run in {folder}"
    out = OfflineRun()
    for path in files:
        for record in read_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                out.runs.append(record.run)
                out.config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
            elif kind == "config":
                out.config.update({u.key: json.loads(u.value_json) for u in record.config.update})
            elif kind == "metric":
                out.metrics[record.metric.name or record.metric.glob_name] = record.metric
            elif kind == "summary":
                out.summary.update({_key(u): json.loads(u.value_json) for u in record.summary.update})
            elif kind == "history":
                out.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
            elif kind == "artifact":
                out.artifacts.append(record.artifact)
    return out


@dataclass
class Sweep:
    root: Path
    jobs: list[Path]
    resumed: Path  # the job launched again from its checkpoint
    first_ids: dict[str, str]  # job folder -> wandb run id before the relaunch


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, worker_id) -> Sweep:
    """The 2x2 multirun, made once per test session (a file lock across xdist workers),
    then one job resumed: its metrics.json removed, the same command again."""
    shared = tmp_path_factory.getbasetemp()
    if worker_id != "master":  # each xdist worker has a folder of its own below the session's
        shared = shared.parent
    root = shared / "wandb-sweep"
    with FileLock(str(shared / "wandb-sweep.lock")):
        done = root / "done.json"
        if not done.exists():
            args = [*SWEEP, f"hydra.sweep.dir={root}", f"paths.data_dir={shared}"]
            first = run_cli(*args)
            assert first.returncode == 0, first.stderr[-3000:]
            jobs = sorted(p.parent.parent for p in root.rglob(".hydra/config.yaml"))
            first_ids = {str(j): json.loads((j / "metrics.json").read_text())["wandb_run_id"] for j in jobs}
            resumed = jobs[0]
            (resumed / "metrics.json").unlink()  # killed after its last checkpoint
            again = run_cli(*args)
            assert again.returncode == 0, again.stderr[-3000:]
            done.write_text(json.dumps({"jobs": [str(j) for j in jobs], "resumed": str(resumed),
                                        "first_ids": first_ids}))
    made = json.loads((root / "done.json").read_text())
    return Sweep(root, [Path(j) for j in made["jobs"]], Path(made["resumed"]), made["first_ids"])


def test_the_sweep_is_one_group_named_like_its_folder_with_distinct_names_rows_and_tags(sweep):
    assert len(sweep.jobs) == 4
    runs = {job: offline_run(job) for job in sweep.jobs}
    assert {run.runs[0].run_group for run in runs.values()} == {sweep.root.name}
    names = {run.runs[0].display_name for run in runs.values()}
    assert names == {f"dropout.sigma={s},dropout.tau={t},seed=0" for s in (8, 16) for t in (2, 4)}
    for run in runs.values():
        sigma, tau = run.config["dropout.sigma"], run.config["dropout.tau"]  # top-level columns
        assert (sigma, tau) == (run.config["dropout"]["sigma"], run.config["dropout"]["tau"])
        assert run.runs[0].job_type == f"{sigma} / {tau}"  # the report's row label
        assert run.config["method.sigma"] == sigma and run.config["method"] == "gyro"
        assert run.config["global_batch"] == 16 and run.config["lr_used"] == run.config["optim"]["lr"]
        assert set(run.runs[0].tags) >= {"gyro", "constant", "lenet", "synthetic"}


def test_the_tables_metrics_are_declared_and_best_test_acc_is_summarized_as_its_max(sweep):
    for job in sweep.jobs:
        run = offline_run(job)
        assert run.metrics["train/*"].step_metric == "step"
        assert run.metrics["test/*"].step_metric == "step" and run.metrics["test/*"].summary.last
        assert run.metrics["best/test_acc"].summary.max
        assert run.metrics["diag/*"].step_metric == "diag/step"
        logged = [row["best/test_acc"] for row in run.history if "best/test_acc" in row]
        assert logged and all("step" in row for row in run.history if "train/loss" in row)
        best = run.summary["best/test_acc"]
        if job != sweep.resumed:  # the resumed attempt logs no evaluation: a plain value
            assert best == {"max": max(logged)}
        assert (best["max"] if isinstance(best, dict) else best) == max(logged)
        assert "train/loss" in run.summary  # written at the end: the last epoch's mean


def test_log_checkpoints_best_leaves_one_artifact_of_best_pt_with_the_config_hash(sweep):
    for job in sweep.jobs:
        artifacts = offline_run(job).artifacts
        digest = json.loads((job / "environment.json").read_text())["config_hash"]
        assert artifacts and {a.name for a in artifacts} == {f"checkpoint-best-{digest}"}
        assert all(json.loads(a.metadata)["config_hash"] == digest for a in artifacts)
        assert {c.path for a in artifacts for c in a.manifest.contents} == {"best.pt"}


def test_a_resumed_job_keeps_its_group_name_and_id(sweep):
    run = offline_run(sweep.resumed)
    assert len(run.runs) >= 2  # started, then resumed
    assert {(r.run_id, r.run_group, r.display_name) for r in run.runs} == {
        (sweep.first_ids[str(sweep.resumed)], sweep.root.name, run.runs[0].display_name)}
    assert json.loads((sweep.resumed / "metrics.json").read_text())["wandb_run_id"] == run.runs[0].run_id


def test_report_wandb_logs_the_table_and_figures_into_one_run_of_the_group(sweep, tmp_path):
    from regdrop.report import main
    from regdrop.report.wandb import markdown_tables

    out = tmp_path / "report"
    assert main([str(sweep.root), "--out", str(out), "--wandb"]) == 0
    (folder,) = out.glob("wandb/offline-run-*")
    run = offline_run(out)
    assert [(r.run_group, r.job_type) for r in run.runs] == [(sweep.root.name, "report")]
    header, rows = markdown_tables((out / "report.md").read_text())["Table"]
    assert len(rows) == 4 and any("±" in cell or "n=" in cell for row in rows for cell in row)
    (table_file,) = folder.glob("files/media/table/report/table_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == header and table["data"] == rows
    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    logged = sorted(folder.glob("files/media/images/report/figures/*.png"))
    assert figures and len(logged) == len(figures)


def test_a_single_run_has_its_own_group_a_short_name_and_no_artifact_by_default(make_config):
    from regdrop.identity import config_hash
    from regdrop.train import train

    cfg = make_config("logger=wandb", *TINY_MODELS["lenet"], "dropout=gyro", "dropout.sigma=8", "dropout.tau=2")
    train(cfg)
    run = offline_run(Path(cfg.paths.output_dir))
    (start,) = run.runs
    assert start.run_group == f"synthetic-lenet-gyro-{config_hash(cfg)}"
    assert start.display_name == "gyro-constant-seed0" and start.job_type == "gyro"
    assert not run.artifacts  # logger.log_checkpoints=none, the default


@pytest.mark.parametrize("overrides, key", [
    (["logger.log_checkpoints=sometimes"], "logger.log_checkpoints"),
    (["logger.log_checkpoints=best", "trainer.keep_best=false"], "logger.log_checkpoints"),
])
def test_a_bad_log_checkpoints_value_is_a_config_error_naming_the_key(make_config, overrides, key):
    from regdrop.config import validate
    from regdrop.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        validate(make_config("logger=wandb", *overrides))
    assert caught.value.key == key


@pytest.mark.parametrize("experiment, kind", [("mini_gyro", "mini"), ("gyro_sigma_tau", "paper")])
def test_an_experiments_runs_are_tagged_with_it_and_its_kind_of_table(tmp_path, experiment, kind):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from regdrop.wandb_log import run_labels
    from tests.conftest import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={experiment}", "logger=wandb"],
                      return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path)
        labels = run_labels(cfg)
    finally:
        HydraConfig.instance().cfg = None
    assert {experiment, kind, cfg.dropout.name, cfg.model.name, cfg.data.name} <= set(labels.tags)
    assert ({"mini", "paper"} - {kind}).isdisjoint(labels.tags)
