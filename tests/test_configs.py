"""Every config file composes and every key in it is one the code reads: a typo fails here."""

import itertools
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError

from regdrop.config import validate
from regdrop.data import build_data
from regdrop.errors import ConfigError
from regdrop.methods import apply_method
from regdrop.optim import build_optimizer
from regdrop.runtime import check_trainer
from regdrop.schedules import DropSchedule
from tests.conftest import CONF, compose_config

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
GROUPS = ["data", "model", "dropout", "schedule", "optim", "lr", "trainer", "logger", "diagnostics"]


def check(cfg) -> None:
    """Every check a run makes before building anything (no data is read)."""
    with open_dict(cfg):
        cfg.data.root = str(CONF.parent / "tests")  # CIFAR/ImageNet are not here: skip presence
        cfg.data.download = True
    validate(cfg)


def test_the_defaults_compose_and_are_valid(tmp_path):
    check(compose_config([], tmp_path))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_is_valid(experiment, tmp_path):
    cfg = compose_config([f"experiment={experiment}"], tmp_path)
    assert cfg.tags, "an experiment names its tags"
    check(cfg)


@pytest.mark.parametrize("group, option", [
    (group, path.stem) for group in GROUPS for path in sorted((CONF / group).glob("*.yaml"))
])
def test_every_group_option_composes_and_is_valid(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if group == "schedule" and option != "constant":
        overrides.append("trainer.epochs=300")  # the paper's 50-epoch cutoffs fit a 300-epoch run
    if group == "dropout" and option == "stochastic_depth":
        overrides.append("model=resnet18")
    if group == "data" and option == "imagenet":
        overrides.append("model=resnet18")
    check(compose_config(overrides, tmp_path))


def test_primary_config_lists_self_first():
    defaults = OmegaConf.load(CONF / "train.yaml").defaults
    assert defaults[0] == "_self_"
    assert {"experiment": None} in [dict(d) if not isinstance(d, str) else d for d in defaults]


def test_experiment_files_are_global_packages():
    for path in (CONF / "experiment").glob("*.yaml"):
        assert Path(path).read_text().startswith("# @package _global_"), path


@pytest.mark.parametrize("section, build", [
    ("data", lambda cfg: build_data(cfg.data)),
    ("trainer", lambda cfg: check_trainer(cfg.trainer)),
    ("optim", lambda cfg: build_optimizer(cfg.optim, torch.nn.Linear(2, 2))),
    ("schedule", lambda cfg: DropSchedule.from_config(cfg.schedule, 10)),
    ("logger", lambda cfg: validate(cfg)),
    ("model", lambda cfg: validate(cfg)),
])
def test_a_key_that_no_code_reads_is_an_error(tmp_path, section, build):
    # An experiment file can bring in a key Hydra merges silently; the code must refuse it.
    cfg = compose_config(["data=synthetic"], tmp_path)
    with open_dict(cfg):
        cfg[section].typo_key = 1
    with pytest.raises(ConfigError) as err:
        build(cfg)
    assert err.value.key == f"{section}.typo_key"


def documented_sweeps(path: Path) -> list[list[str]]:
    """Every job of the `python train.py -m ...` commands in an experiment file's comments."""
    jobs = []
    for line in path.read_text().splitlines():
        if not line.startswith("#") or "python train.py" not in line:
            continue
        command = line.split("python train.py", 1)[1].split(" #")[0]  # a trailing comment
        args = [a for a in command.split() if a != "-m"]
        choices = [[f"{a.split('=')[0]}={v}" for v in a.split("=", 1)[1].split(",")]
                   if "," in a and "[" not in a else [a] for a in args]
        jobs.extend(list(job) for job in itertools.product(*choices))
    return jobs


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_the_sweeps_an_experiment_file_documents_are_valid(experiment, tmp_path):
    jobs = documented_sweeps(CONF / "experiment" / f"{experiment}.yaml")
    assert jobs, "an experiment file shows the command that reproduces its result"
    for job in jobs:
        assert f"experiment={experiment}" in job
        check(compose_config(job, tmp_path))


def test_a_dropout_key_no_method_reads_is_refused_by_its_schema_and_by_the_method(tmp_path):
    # The schema (the method's options) refuses it at composition, even in open_dict...
    cfg = compose_config(["data=synthetic"], tmp_path)
    with pytest.raises(ConfigAttributeError, match="typo_key"), open_dict(cfg):
        cfg.dropout.typo_key = 1
    # ...and a section that never went through the schema is checked by the method.
    section = {**OmegaConf.to_container(cfg.dropout), "typo_key": 1}
    with pytest.raises(ConfigError) as err:
        apply_method(torch.nn.Sequential(torch.nn.Dropout()), section)
    assert err.value.key == "dropout.typo_key"
