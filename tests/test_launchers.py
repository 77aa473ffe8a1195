"""Sweeps through Hydra's real launcher and sweeper plugins (docs/scaling.md).

joblib runs a multirun's jobs in parallel processes; the submitit launchers submit them to
SLURM (here only composed, and the sbatch script written up to a refusing `sbatch`) or run
them as local subprocesses; the Optuna sweeper searches gyro's p, sigma and tau, and a trial
with tau > sigma fails without stopping the study.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import read_write

from regdrop.runfolder import read_failed_jobs
from tests.conftest import CONF, FASHION_MNIST_INSTALLED, TINY, TINY_MODELS, run_cli

WITH_WANDB = [o for o in TINY if o != "logger=none"]


def job_dirs(sweep: Path) -> list[Path]:
    """The sweep's job folders (named by their config hash), in job-number order."""
    def number(job: Path) -> int:
        return yaml.safe_load((job / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["num"]

    return sorted((p.parent.parent for p in sweep.rglob(".hydra/config.yaml")), key=number)


def failed_jobs(sweep: Path) -> list[str]:
    """Jobs rejected before they wrote a folder (regdrop.cli records them)."""
    return [record.line() for record in read_failed_jobs(sweep)[0]]


def job_overrides(job: Path) -> dict[str, str]:
    return dict(o.split("=", 1) for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()))


def assert_metrics_and_wandb_run(job: Path) -> str:
    metrics = json.loads((job / "metrics.json").read_text())
    run_id = metrics["wandb_run_id"]
    assert run_id and list((job / "wandb").glob(f"offline-run-*-{run_id}")), f"no wandb run in {job}"
    return run_id


# --- joblib: parallel processes on one machine ------------------------------------------

@pytest.mark.slow  # two processes each importing torch: ~40-60 s on 2 cores
def test_joblib_runs_the_jobs_in_parallel_processes_each_with_metrics_and_wandb_run(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "model=lenet,alexnet",
                     "model.width=0.125", *WITH_WANDB, f"hydra.sweep.dir={sweep}",
                     f"paths.data_dir={tmp_path / 'data'}", env={"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = job_dirs(sweep)
    assert [job_overrides(j)["model"] for j in jobs] == ["lenet", "alexnet"]
    assert len({assert_metrics_and_wandb_run(j) for j in jobs}) == 2
    # The basic launcher runs every job in the sweep's own process; joblib's workers are others.
    pids = [json.loads((j / "run.json").read_text())["pid"] for j in jobs]
    assert len(set(pids)) == 2


def test_gpu_per_job_interpolation_gives_each_job_its_own_device():
    """docs/scaling.md: `trainer.device=cuda:${hydra:job.num}` puts job N on GPU N."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True, overrides=[
            "hydra/launcher=joblib", "trainer.device=cuda:${hydra:job.num}"])
    devices = []
    try:
        for num in (0, 1, 3):
            with read_write(cfg.hydra):
                cfg.hydra.job.num = num  # what the joblib launcher sets in each job
            HydraConfig.instance().set_config(cfg)
            devices.append(torch.device(cfg.trainer.device))
    finally:
        HydraConfig.instance().cfg = None
    assert devices == [torch.device("cuda", n) for n in (0, 1, 3)]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_joblib_jobs_on_their_own_gpus(tmp_path):
    sweep = tmp_path / "sweep"
    tiny_gpu = [o for o in TINY if not o.startswith("trainer.device")]
    result = run_cli("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1",
                     *TINY_MODELS["lenet"], *tiny_gpu, "trainer.device=cuda:${hydra:job.num}",
                     f"hydra.sweep.dir={sweep}", f"paths.data_dir={tmp_path / 'data'}")
    assert result.returncode == 0, result.stderr[-3000:]
    for num, job in enumerate(job_dirs(sweep)):
        assert (job / "metrics.json").exists()
        assert f"cuda:{num}" in (job / "train.log").read_text()


# --- submitit: SLURM and local ------------------------------------------------------------

@pytest.mark.parametrize("mode", [[], ["hydra.mode=MULTIRUN"], ["-m"]])
def test_submitit_slurm_launcher_composes(mode):
    # Hydra 1.3 refuses -m with --cfg; train.py turns -m into hydra.mode=MULTIRUN there.
    result = run_cli(*mode, "hydra/launcher=submitit_slurm", "model=lenet", "--cfg", "hydra")
    assert result.returncode == 0, result.stderr[-3000:]
    launcher = yaml.safe_load(result.stdout)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert {"partition", "account", "timeout_min", "gpus_per_node", "max_num_timeout"} <= set(launcher)


def slurm_conf(tmp_path: Path, local: dict) -> Path:
    """The project's config tree with ``local`` as the git-ignored conf/local/slurm.yaml."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    for user_file in ("default.yaml", "slurm.yaml"):  # this machine's own local files stay out
        (conf / "local" / user_file).unlink(missing_ok=True)
    example = yaml.safe_load((CONF / "local" / "slurm.example.yaml").read_text())
    (conf / "local" / "slurm.yaml").write_text(yaml.safe_dump({**example, **local}))
    return conf


def test_slurm_preset_takes_the_cluster_values_from_conf_local(tmp_path):
    conf = slurm_conf(tmp_path, {"partition": "gpu-a100", "account": "dropout-lab", "timeout_min": 720})
    result = run_cli("--config-path", str(conf), "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4",
                     "--cfg", "hydra")
    assert result.returncode == 0, result.stderr[-3000:]
    launcher = yaml.safe_load(result.stdout)["hydra"]["launcher"]
    assert launcher["partition"] == "gpu-a100" and launcher["account"] == "dropout-lab"
    assert launcher["timeout_min"] == 720  # conf/local wins over the preset's 240
    assert launcher["gpus_per_node"] == 4  # the command line wins over conf/local


def test_slurm_sweep_writes_an_sbatch_array_with_the_local_values(tmp_path):
    """The real plugin and submitit, up to an `sbatch` that refuses: no job leaves the machine."""
    conf = slurm_conf(tmp_path, {"partition": "gpu-a100", "account": "dropout-lab", "timeout_min": 720})
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sbatch", "srun"):  # submitit looks for srun, then submits with sbatch
        (bin_dir / tool).write_text("#!/bin/sh\necho 'no cluster in the tests' >&2\nexit 1\n")
        (bin_dir / tool).chmod(0o755)
    sweep = tmp_path / "sweep"
    result = run_cli("--config-path", str(conf), "-m", "hydra/launcher=slurm", "model=lenet",
                     "seed=0,1,2", "hydra.launcher.max_num_timeout=3", f"hydra.sweep.dir={sweep}",
                     env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert result.returncode != 0 and "no cluster in the tests" in result.stderr
    [script] = (sweep / ".submitit").glob(".submission_file_*.sh")
    directives = {line.split("=")[0]: line.split("=", 1)[1]
                  for line in script.read_text().splitlines() if line.startswith("#SBATCH")}
    assert directives["#SBATCH --partition"] == "gpu-a100"
    assert directives["#SBATCH --account"] == "dropout-lab"
    assert directives["#SBATCH --time"] == "720"
    assert directives["#SBATCH --gpus-per-node"] == "1"
    assert directives["#SBATCH --array"].startswith("0-2")  # one array task per sweep job
    assert directives["#SBATCH --signal"] == "USR2@120"  # submitit's requeue signal
    assert "-m submitit.core._submit" in script.read_text()


@pytest.mark.slow  # two subprocesses each importing torch: ~40-70 s on 2 cores
def test_submitit_local_runs_real_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli("-m", "hydra/launcher=submitit_local", "seed=0,1", *TINY_MODELS["lenet"],
                     *WITH_WANDB, f"hydra.sweep.dir={sweep}", f"paths.data_dir={tmp_path / 'data'}",
                     env={"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = job_dirs(sweep)
    assert [job_overrides(j)["seed"] for j in jobs] == ["0", "1"]
    assert len({assert_metrics_and_wandb_run(j) for j in jobs}) == 2
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2


@pytest.mark.slow  # four attempts of one minute each: ~2.5 min
def test_submitit_requeues_a_timed_out_job_into_the_same_job_folder(tmp_path):
    """The half of the resume contract that the launcher keeps (docs/scaling.md): a job
    signalled before its time limit is requeued and runs again in the same job folder, where
    its checkpoint is. submitit_local signals 30 s before the limit and requeues 3 times."""
    endless = [o for o in TINY if o != "trainer=smoke"] + ["trainer.epochs=1000000", "trainer.progress=false"]
    result = run_cli("-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=1",
                     *TINY_MODELS["lenet"], *endless, f"paths.log_dir={tmp_path}",
                     f"paths.data_dir={tmp_path / 'data'}", timeout=600)
    assert result.returncode != 0 and "timed-out too many times" in result.stderr
    [sweep] = (tmp_path / "train" / "multiruns").iterdir()  # the launcher resolves it once
    [job] = job_dirs(sweep)
    [log] = (sweep / ".submitit").glob("*/*_0_log.err")
    assert log.read_text().count("Caught signal SIGUSR2") == 4  # the first run and 3 requeues
    assert (job / "metrics.jsonl").exists()


# --- Optuna: hparams_search=gyro_optuna ---------------------------------------------------

def is_invalid(job: Path) -> bool:
    overrides = job_overrides(job)
    return int(overrides["dropout.tau"]) > int(overrides["dropout.sigma"])


def check_study(sweep: Path, output: str, n_trials: int) -> None:
    jobs = job_dirs(sweep)  # the trials that trained; an invalid one stops before writing a folder
    invalid = failed_jobs(sweep)
    assert invalid, "the seeded search space gives an invalid trial first"
    assert len(jobs) + len(invalid) == n_trials
    for job in jobs:
        assert (job / "metrics.json").exists() and not is_invalid(job), job
    for line in invalid:
        values = dict(item.split("=", 1) for item in line.split("(", 1)[1].split(")", 1)[0].split())
        assert int(values["dropout.tau"]) > int(values["dropout.sigma"])
    assert output.count("Failed experiment") == len(invalid)
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    best = results["best_params"]
    assert set(best) == {"dropout.p", "dropout.sigma", "dropout.tau"}
    assert best["dropout.tau"] <= best["dropout.sigma"] and 0.1 <= best["dropout.p"] <= 0.7
    completed = {j: json.loads((j / "metrics.json").read_text())["best/test_acc"]
                 for j in jobs if not is_invalid(j)}
    assert results["best_value"] == pytest.approx(max(completed.values()))


# Essential, so in the fast suite though it runs two trials (~15 s; ~40 s on a loaded machine).
def test_optuna_invalid_trial_fails_and_the_study_goes_on(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli("-m", "hparams_search=gyro_optuna", "hydra.sweeper.n_trials=2", *TINY,
                     *TINY_MODELS["lenet"], f"hydra.sweep.dir={sweep}", f"paths.data_dir={tmp_path / 'data'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "job 0 (" in failed_jobs(sweep)[0] and len(job_dirs(sweep)) == 1
    check_study(sweep, result.stdout + result.stderr, n_trials=2)


@pytest.mark.slow  # one trial that fails at once, but optuna and torch imports: ~15-40 s
def test_optuna_study_without_a_completed_trial_fails(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli("-m", "hparams_search=gyro_optuna", "hydra.sweeper.n_trials=1", *TINY,
                     f"hydra.sweep.dir={sweep}", f"paths.data_dir={tmp_path / 'data'}")
    assert result.returncode != 0 and "No trials are completed yet" in result.stderr
    assert not (sweep / "optimization_results.yaml").exists()


@pytest.mark.slow  # four trials: ~50 s on 2 cores
def test_optuna_four_trials_write_the_best_parameters(tmp_path):
    sweep = tmp_path / "sweep"
    data = [] if FASHION_MNIST_INSTALLED else ["data=synthetic"]  # the README's command, real data
    result = run_cli("-m", "hparams_search=gyro_optuna", "trainer=smoke", "hydra.sweeper.n_trials=4",
                     "trainer.device=cpu", *data, f"hydra.sweep.dir={sweep}",
                     f"paths.data_dir={tmp_path / 'data'}", env={"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-3000:]
    check_study(sweep, result.stdout + result.stderr, n_trials=4)
    for job in job_dirs(sweep):
        if not is_invalid(job):
            assert_metrics_and_wandb_run(job)
