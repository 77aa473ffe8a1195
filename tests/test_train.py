"""End to end: train() and `python train.py` as users run them."""

import json
from pathlib import Path

import numpy as np
import pytest
from hydra.errors import ConfigCompositionException

from regdrop.errors import ConfigError
from regdrop.train import train
from tests.conftest import FASHION_MNIST_INSTALLED, TINY, TINY_MODELS, compose_config, run_cli


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_writes_metrics_files_and_an_offline_wandb_run(make_config, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = make_config("logger=wandb", *TINY_MODELS["lenet"])
    summary = train(cfg)
    out_path = Path(cfg.paths.output_dir)
    metrics = json.loads((out_path / "metrics.json").read_text())
    for key in ("train/loss", "test/loss", "test/acc", "best/test_acc", "epoch", "step", "wall_time_s", "samples_per_s"):
        assert key in metrics, key
    assert metrics["step"] == 4 and summary["best/test_acc"] == metrics["best/test_acc"]
    records = read_jsonl(out_path / "metrics.jsonl")
    steps = [r for r in records if "train/loss" in r]
    evals = [r for r in records if "test/acc" in r]
    assert [r["step"] for r in steps] == [0, 1, 2, 3]
    assert all({"epoch", "lr", "train/drop_rate"} <= set(r) for r in steps)
    assert len(evals) == 1 and 0 <= evals[0]["test/acc"] <= 1
    runs = list((out_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert metrics["wandb_run_id"] in runs[0].name
    assert (out_path / "drop_schedule.png").stat().st_size > 1000


@pytest.mark.parametrize("model", list(TINY_MODELS))
def test_every_model_trains_on_synthetic_rgb_data(make_config, model):
    summary = train(make_config(*TINY_MODELS[model], "data.channels=3", "data.image_size=32"))
    assert summary["step"] == 4 and np.isfinite(summary["train/loss"])


@pytest.mark.skipif(not FASHION_MNIST_INSTALLED, reason="Debian's dataset-fashion-mnist is not installed")
@pytest.mark.parametrize("model", list(TINY_MODELS))
def test_every_model_trains_on_real_fashion_mnist(make_config, model, tmp_path):
    cfg = make_config(*TINY_MODELS[model], "data=fashion_mnist", "data.subset=256", "data.batch_size=32",
                      f"data.root={tmp_path / 'data'}")
    summary = train(cfg)
    assert summary["step"] == 4 and 0 <= summary["test/acc"] <= 1


@pytest.mark.parametrize("accum", [1, 3])
@pytest.mark.parametrize("schedule", [
    ["schedule=early", "schedule.shape=linear", "schedule.cutoff_epoch=1.5"],
    ["schedule=early", "schedule.shape=constant", "schedule.cutoff_epoch=0.75"],
    ["schedule=late", "schedule.cutoff_epoch=1.25"],
    ["schedule=warmup", "schedule.warmup_epochs=0.5"],
])
def test_logged_drop_rate_follows_the_schedule_in_optimizer_steps(make_config, schedule, accum):
    # 96 images, batch 8: 12 micro-batches an epoch, 12 // accum optimizer steps.
    cfg = make_config(*TINY_MODELS["lenet"], *schedule, "data.num_train=96", "data.batch_size=8",
                      f"trainer.grad_accum={accum}", "trainer.max_steps=null", "trainer.epochs=3",
                      "dropout=standard", "dropout.p=0.4", "trainer.eval_every=3")
    train(cfg)
    logged = [r["train/drop_rate"] for r in read_jsonl(Path(cfg.paths.output_dir) / "metrics.jsonl")
              if "train/drop_rate" in r]
    per_epoch = 12 // accum
    total = 3 * per_epoch
    assert len(logged) == total
    name = schedule[0].split("=")[1]
    epochs = float(schedule[-1].split("=")[1])
    n = round(epochs * per_epoch)
    if name == "early" and "schedule.shape=linear" in schedule:
        expected = np.concatenate([np.linspace(0.4, 0, n), np.zeros(total - n)])
    elif name == "early":
        expected = np.r_[np.full(n, 0.4), np.zeros(total - n)]
    elif name == "late":
        expected = np.r_[np.zeros(n), np.full(total - n, 0.4)]
    else:
        expected = np.r_[np.linspace(0, 0.4, n), np.full(total - n, 0.4)]
    np.testing.assert_allclose(logged, expected, rtol=0, atol=1e-12)


@pytest.mark.slow  # a subprocess; in-process equivalents run by default
def test_cfg_job_prints_the_composed_config():
    result = run_cli("--cfg", "job", "dropout=gyro")
    assert result.returncode == 0, result.stderr
    assert "dropout:" in result.stdout and "name: gyro" in result.stdout and "trainer:" in result.stdout


@pytest.mark.slow  # a subprocess; in-process equivalents run by default
def test_multirun_gives_one_folder_metrics_and_wandb_run_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli("-m", "model=lenet,resnet18", "model.width=0.125", *[o for o in TINY if o != "logger=none"],
                     f"hydra.sweep.dir={sweep}", f"paths.data_dir={tmp_path}", env={"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-3000:]
    ids = set()
    jobs = sorted(p.parent for p in sweep.rglob("metrics.json"))
    assert len(jobs) == 2
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        ids.add(metrics["wandb_run_id"])
        assert list((job / "wandb").glob(f"offline-run-*{metrics['wandb_run_id']}"))
    assert len(ids) == 2


@pytest.mark.slow  # a subprocess; in-process equivalents run by default
def test_missing_cifar10_stops_before_training_with_a_message(tmp_path):
    result = run_cli("data=cifar10", f"data.root={tmp_path / 'nowhere'}", "logger=none",
                     f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert "data.root" in result.stderr and "Traceback" not in result.stderr
    assert "cifar" in result.stderr.lower()
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.slow  # five subprocesses; tests/test_bad_input.py covers these in-process
@pytest.mark.parametrize("overrides, key", [
    (["dropout=gyro", "dropout.tau=0"], "dropout.tau"),
    (["dropout.p=1.5"], "dropout.p"),
    (["trainer.grad_accum=0"], "trainer.grad_accum"),
    (["schedule=early", "schedule.shape=cosine"], "schedule.shape"),
    (["dropout=stochastic_depth", "model=alexnet"], "residual"),
])
def test_bad_values_give_one_paragraph_naming_the_key(tmp_path, overrides, key):
    result = run_cli(*TINY, *overrides, f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert key in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n\n") == 0  # one paragraph


@pytest.mark.slow  # a subprocess; in-process equivalents run by default
def test_unknown_keys_are_errors(tmp_path):
    result = run_cli(*TINY, "trainer.epochz=3", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode != 0 and "epochz" in result.stderr
    result = run_cli(*TINY, "dropout.sigma=3", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode != 0 and "sigma" in result.stderr


def test_same_seed_same_run_and_another_seed_another(tmp_path):
    def losses(seed, name):
        cfg = compose_config([*TINY, *TINY_MODELS["lenet"], "trainer.deterministic=true", f"seed={seed}",
                              "dropout=gyro", "dropout.sigma=8", "dropout.tau=4"], tmp_path / name)
        train(cfg)
        return [r["train/loss"] for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "train/loss" in r]

    first = losses(0, "a")
    assert losses(0, "b") == first
    assert losses(1, "c") != first


@pytest.mark.parametrize("overrides, key", [
    (["data.batch_size=abc"], "data.batch_size"),
    (["data.noise=abc"], "data.noise"),
    (["trainer.grad_clip=abc"], "trainer.grad_clip"),
    (["trainer.threads=0"], "trainer.threads"),
    (["trainer.epochs=true"], "trainer.epochs"),
    (["optim.lr=-1"], "optim.lr"),
    (["schedule=late", "schedule.cutoff_epoch=true"], "schedule.cutoff_epoch"),
    (["+foo=1"], "foo"),
])
def test_wrongly_typed_values_and_stray_keys_are_config_errors(make_config, overrides, key):
    with pytest.raises(ConfigError) as err:
        train(make_config(*TINY_MODELS["lenet"], *overrides))
    assert err.value.key == key


def test_a_wrongly_typed_method_option_is_refused_when_the_config_is_composed(make_config):
    # A method's options are the schema of its conf/dropout file: OmegaConf checks the type.
    with pytest.raises(ConfigCompositionException, match="dropout.p"):
        make_config(*TINY_MODELS["lenet"], "dropout.p=abc")


def test_lr_milestones_must_be_numbers(make_config):
    with pytest.raises(ConfigError) as err:
        train(make_config(*TINY_MODELS["lenet"], "lr=multistep", "lr.milestones=[1,abc]"))
    assert err.value.key == "lr.milestones"


def test_a_stray_world_size_without_torchrun_does_not_shrink_epochs(make_config, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")  # no RANK: not a torchrun launch
    monkeypatch.delenv("RANK", raising=False)
    summary = train(make_config(*TINY_MODELS["lenet"], "trainer.max_steps=null", "trainer.epochs=1"))
    assert summary["step"] == 64 // 16
