"""The papers' tables as experiment files, and the recipe pieces they need.

* Every experiment file composes to the paper's hyper-parameters (a table of the papers'
  values kept here, with where each comes from), its models have the sizes the papers
  state, its sweep is the table's grid, its ``table`` section places every cell.
* Every experiment file trains end to end at smoke size.
* Each recipe piece behaves: mixup, CutMix, their switch, label smoothing, the soft-target
  loss through multi-sample dropout and the accuracy metric, the LR scaling rule, the
  no-weight-decay groups. (RandAugment, random erasing and the 24 px crops: test_data.py.)
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict
from timm.loss import SoftTargetCrossEntropy

from regdrop.config import validate
from regdrop.data import DataInfo, data_info
from regdrop.errors import ConfigError
from regdrop.losses import build_loss, hard_labels
from regdrop.methods import apply_method, predictions, setup_run
from regdrop.models import build_model
from regdrop.optim import build_optimizer, scaled_lr
from regdrop.report.table import TableSpec
from regdrop.runtime import Runtime
from regdrop.train import StepParts, train, train_step
from tests.conftest import CONF, run_cli

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml") if not p.stem.startswith("mini_"))
TABLE_FREE = {"gyro_lenet_cifar10"}  # one cell of a table, kept sweep-free for searches and launchers


def compose_job(overrides: list[str], output_dir: Path) -> tuple[DictConfig, dict[str, str]]:
    """The config ``python train.py <overrides>`` runs, and its ``hydra.sweeper.params``."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    params = {str(k): str(v) for k, v in OmegaConf.to_container(params).items()} if params else {}
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.data_dir = str(output_dir / "data")
    return cfg, params


def sweep_jobs(params: dict[str, str]) -> list[list[str]]:
    """The jobs Hydra's basic sweeper makes of ``hydra.sweeper.params`` (their product)."""
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    axes = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
            else [f"{o.get_key_element()}={o.get_value_element_as_str()}"] for o in parsed]
    return [list(job) for job in itertools.product(*axes)]


def value(cfg: DictConfig, key: str):
    found = OmegaConf.select(cfg, key, throw_on_missing=True)
    return OmegaConf.to_container(found) if OmegaConf.is_config(found) else found


def checkable(cfg: DictConfig) -> DictConfig:
    """The config as `validate` sees it, with the data's presence not checked (no CIFAR or
    ImageNet here)."""
    with open_dict(cfg):
        cfg.data.download = True
    return cfg


# -- the papers' values ----------------------------------------------------------------------
# Liu et al. 2023: the official code's defaults and README flags (../shared reference, §1).
LIU_RECIPE = {
    "data.name": "imagenet", "data.image_size": 224, "data.batch_size": 128, "data.augment": True,
    "data.randaugment": "rand-m9-mstd0.5-inc1", "data.random_erasing": 0.25, "data.interpolation": "bicubic",
    "optim.name": "adamw", "optim.lr": 4e-3, "optim.reference_batch": 4096, "optim.weight_decay": 0.05,
    "optim.betas": [0.9, 0.999],
    "lr.name": "cosine", "lr.warmup_epochs": 50, "lr.warmup_start_factor": 0.0, "lr.min_factor": 1e-6 / 4e-3,
    "loss.mixup_alpha": 0.8, "loss.cutmix_alpha": 1.0, "loss.switch_prob": 0.5, "loss.mix_prob": 1.0,
    "loss.mix_mode": "batch", "loss.label_smoothing": 0.1, "trainer.epochs": 300,
}
# The rates are null in the rows: each model recommends Liu et al.'s (LIU_RATES below).
LIU_SD = {"dropout.name": "stochastic_depth", "dropout.p": None, "dropout.mode": "sample",
          "dropout.distribution": "linspace", "dropout.scaling": "inverted"}
LIU_DROPOUT = {"dropout.name": "standard", "dropout.p": None, "dropout.sites": ["token", "attn"]}
LIU_EARLY = {"schedule.name": "early", "schedule.shape": "linear", "schedule.cutoff_epoch": 50}
LIU_ARMS = {
    "liu_none": {"dropout.name": "none", "schedule.name": "constant"},
    "liu_dropout": {**LIU_DROPOUT, "schedule.name": "constant"},
    "liu_sd": {**LIU_SD, "schedule.name": "constant"},
    "liu_early_dropout": {**LIU_DROPOUT, **LIU_EARLY},
    "liu_early_sd": {**LIU_SD, **LIU_EARLY},
    "liu_late_sd": {**LIU_SD, "schedule.name": "late", "schedule.cutoff_epoch": 50},
}
# Their README's flags, one set for all models: dropout 0.1 and drop path 0.5 (early), drop
# path 0.4 (late, ViT-B and Mixer-B); no dropout on ConvNeXt. (model spec, p, drop_rate)
LIU_RATES = {
    "vit_tiny": ({"name": "vit_tiny", "depth": 2}, 0.1, 0.5),
    "mixer_s32": ({"name": "mixer", "size": "s32", "depth": 2}, 0.1, 0.5),
    "swin_femto": ({"name": "swin_femto", "depths": [2, 2], "num_heads": [2, 4]}, 0.1, 0.5),
    "convnext_femto": ({"name": "convnext_femto", "depths": [1, 1, 1, 1]}, None, 0.5),
    "vit_base": ({"name": "vit_base", "depth": 2}, None, 0.4),
    "mixer_b16": ({"name": "mixer", "size": "b16", "depth": 2}, None, 0.4),
}
LIU_ROWS = ["liu_none", "liu_dropout", "liu_sd", "liu_early_dropout", "liu_early_sd"]
# Lee et al. 2022: the authors' TensorFlow code (mlsys-seo/gyro-dropout main.py).
GYRO_RECIPE = {
    "data.batch_size": 256, "data.augment": True, "data.crop_size": 24,
    "optim.name": "rmsprop", "optim.lr": 0.007, "optim.alpha": 0.9, "optim.momentum": 0.9, "optim.eps": 1.0,
    "optim.weight_decay": 0.0, "optim.reference_batch": 256,
    "lr.name": "multistep", "lr.milestones": [40, 80], "lr.gamma": 0.1, "trainer.epochs": 100,
    "dropout.p": 0.5, "optimized_metric": "best/test_acc",
}
GYRO_PAPER_NETS = {"dropout.name": "gyro", "dropout.sigma": None, "dropout.tau": None, "model.width": 1.0}
# Wan et al. 2013: no-drop / dropout / DropConnect at p = 0.5, per-example masks, Gaussian
# inference with Z = 1000 samples, no augmentation.
WAN_ARMS = {
    "wan_none": {"dropout.name": "none"},
    "wan_dropout": {"dropout.name": "standard", "dropout.p": 0.5, "dropout.sites": ["fc"]},
    "wan_dropconnect": {"dropout.name": "dropconnect", "dropout.p": 0.5, "dropout.per": "example",
                        "dropout.inference": "gaussian", "dropout.samples": 1000},
}

PAPER: dict[str, dict] = {
    "liu_early_basic": {
        "values": {**LIU_RECIPE, "model.name": "vit_tiny", **LIU_ARMS["liu_early_dropout"]},
        "sweep": {"arm": LIU_ROWS, "model": ["vit_tiny", "mixer_s32", "swin_femto", "convnext_femto"]},
        "refused": [["arm=liu_dropout", "model=convnext_femto"], ["arm=liu_early_dropout", "model=convnext_femto"]],
    },
    "liu_early_improved": {
        "values": {**LIU_RECIPE, "model.name": "vit_tiny", **LIU_ARMS["liu_early_dropout"], "trainer.epochs": 600,
                   "loss.mixup_alpha": 0.3, "loss.cutmix_alpha": 0.3},
        "sweep": {"arm": LIU_ROWS, "model": ["vit_tiny", "swin_femto", "convnext_femto"]},
        "refused": [["arm=liu_dropout", "model=convnext_femto"], ["arm=liu_early_dropout", "model=convnext_femto"]],
    },
    "liu_late_sd": {
        "values": {**LIU_RECIPE, "model.name": "vit_base", **LIU_ARMS["liu_late_sd"]},
        "sweep": {"arm": ["liu_sd", "liu_late_sd"], "model": ["vit_base", "mixer_b16"]},
        "jobs": {"arm=liu_sd": {"p": 0.4, "schedule.name": "constant"}},
    },
    "gyro_lenet_alexnet_cifar": {
        "values": {**GYRO_RECIPE, **GYRO_PAPER_NETS, "data.name": "cifar10", "model.name": "lenet"},
        "sweep": {"dropout": ["standard", "gyro"], "model": ["lenet", "alexnet"], "data": ["cifar10", "cifar100"],
                  "seed": ["0", "1", "2"]},
        "jobs": {"dropout=gyro": {"sigma": 256, "tau": 16}, "dropout=standard": {"dropout.p": 0.5, "p": 0.5}},
    },
    "gyro_lenet_cifar10": {
        "values": {**GYRO_RECIPE, **GYRO_PAPER_NETS, "data.name": "cifar10", "model.name": "lenet"},
        "sweep": {}, "jobs": {"": {"sigma": 256, "tau": 16}},
    },
    "gyro_sigma_tau": {
        "values": {**GYRO_RECIPE, "dropout.name": "gyro", "model.width": 1.0, "data.name": "cifar10",
                   "model.name": "lenet"},
        "sweep": {"dropout.sigma": ["64", "128", "256", "512", "1024"], "dropout.tau": ["4", "8", "16", "32"]},
    },
    "gyro_resnet18_cifar10": {
        "values": {**GYRO_RECIPE, "dropout.name": "gyro", "dropout.sigma": None, "dropout.tau": None,
                   "data.name": "cifar10", "model.name": "resnet18", "model.width": 1.0},
        "sweep": {"dropout": ["standard", "gyro"], "seed": ["0", "1", "2"]},
        "jobs": {"dropout=gyro": {"sigma": 1024, "tau": 8}},  # the card's ResNet-18 choice, from the model
    },
    "huang_resnet110_cifar": {  # Huang et al.'s code (yueatsprograms/Stochastic_Depth main.lua)
        "values": {"model.name": "resnet110", "model.width": 1.0, "model.shortcut": "A", "data.batch_size": 128,
                   "data.augment": True, "dropout.name": "stochastic_depth", "dropout.p": 0.5,
                   "dropout.mode": "block", "dropout.distribution": "linear", "dropout.scaling": "test_time",
                   "optim.name": "sgd", "optim.lr": 0.1, "optim.momentum": 0.9, "optim.nesterov": True,
                   "optim.weight_decay": 1e-4, "lr.name": "multistep", "lr.milestones": [250, 375],
                   "lr.gamma": 0.1, "trainer.epochs": 500, "schedule.name": "constant"},
        "sweep": {"dropout.p": ["0.0", "0.5"], "data": ["cifar10", "cifar100"], "seed": ["0", "1", "2"]},
    },
    "composer_sd_resnet_imagenet": {  # the card, and Composer's resnet50.yaml baseline
        "values": {"model.name": "resnet50", "data.name": "imagenet", "dropout.name": "stochastic_depth",
                   "dropout.p": 0.1, "dropout.mode": "sample", "dropout.distribution": "linear",
                   "dropout.scaling": "test_time", "optim.name": "sgd", "optim.lr": 2.048,
                   "optim.reference_batch": 2048, "optim.momentum": 0.875, "optim.nesterov": False,
                   "lr.name": "cosine", "lr.warmup_epochs": 8, "lr.min_factor": 0.0, "trainer.epochs": 90},
        "sweep": {"dropout.p": ["0.0", "0.1"], "model": ["resnet50", "resnet101"]},
    },
    "dropblock_resnet50_imagenet": {  # the paper's headline; the authors' code for the ramp and groups
        "values": {"model.name": "resnet50", "data.name": "imagenet", "dropout.name": "dropblock",
                   "dropout.p": 0.1, "dropout.block_size": 7, "dropout.stages": [3, 4],
                   "dropout.stage_decay": 4.0, "schedule.name": "warmup", "schedule.warmup_epochs": 270,
                   "trainer.epochs": 270, "optim.name": "sgd", "optim.nesterov": True},
        "sweep": {"dropout.p": ["0.0", "0.1"], "model": ["resnet50"]},
    },
    "dropblock_resnet_cifar": {  # regdrop's setting: the paper has no CIFAR table
        "values": {"model.name": "resnet56", "data.name": "cifar10", "dropout.name": "dropblock",
                   "dropout.p": 0.1, "dropout.block_size": 3, "dropout.stages": [2, 3],
                   "schedule.name": "warmup", "schedule.warmup_epochs": 300, "trainer.epochs": 300},
        "sweep": {"dropout.p": ["0.0", "0.1"], "data": ["cifar10", "cifar100"], "seed": ["0", "1", "2"]},
    },
    "rdrop_vit_cifar100": {  # the official ViT code's recipe, from scratch (no pretrained weights offline)
        "values": {"model.name": "vit_base", "data.name": "cifar100", "data.batch_size": 512,
                   "dropout.name": "rdrop", "dropout.alpha": 0.3, "dropout.base": "standard",
                   "dropout.base_options": {"p": 0.1, "sites": ["fc", "token"]}, "optim.name": "sgd",
                   "optim.lr": 0.01, "optim.momentum": 0.9, "optim.weight_decay": 0.0, "lr.name": "cosine",
                   "lr.warmup_epochs": 5.12, "trainer.grad_clip": 1.0, "trainer.epochs": 2048},
        "sweep": {"arm": ["rdrop_dropout", "rdrop_rdrop"], "seed": ["0", "1", "2"]},
    },
    "inoue_multisample_cifar": {
        "values": {"model.name": "vgg16", "data.name": "cifar10", "dropout.name": "multisample", "dropout.p": 0.5,
                   "dropout.samples": 8, "data.augment": True},
        "sweep": {"dropout.samples": ["1", "2", "4", "8"], "data": ["cifar10", "cifar100"], "seed": ["0", "1", "2"]},
    },
    "wan_dropconnect_mnist": {
        "values": {"model.name": "mlp", "model.hidden": [800, 800], "model.activation": "relu",
                   "data.name": "fashion_mnist", "data.augment": False, **WAN_ARMS["wan_dropconnect"]},
        "sweep": {"arm": list(WAN_ARMS), "seed": ["0", "1", "2"]},
    },
    "wan_dropconnect_cifar10": {
        "values": {"model.name": "cuda_convnet", "model.width": 1.0, "data.name": "cifar10",
                   "data.augment": False, **WAN_ARMS["wan_dropconnect"]},
        "sweep": {"arm": list(WAN_ARMS), "seed": ["0", "1", "2"]},
    },
}
# Sizes stated in print: parameters (millions, at the paper's data: ImageNet 224 px and 1000
# classes, CIFAR-10) within 2%, or the layer widths where the paper gives those instead.
PARAMETERS_M = {
    "vit_tiny": 5.7, "vit_base": 86,  # DeiT (Touvron et al. 2021), the ViTs Liu et al. train
    "mixer_s32": 19, "mixer_b16": 59,  # MLP-Mixer (Tolstikhin et al. 2021), Table 1
    "convnext_femto": 5.2,  # timm's convnext_femto card (Liu et al.'s ConvNeXt-F)
    "resnet50": 25.6, "resnet101": 44.5,  # torchvision's cards (Composer trains torchvision's)
    "resnet110": 1.7,  # He et al. 2016, Table 6 (Huang et al.'s network)
}
WIDTHS = {  # Conv2d out_channels, Linear out_features (the classifier last)
    "lenet": ([96, 256], [1024, 1024]), "alexnet": ([96, 256, 384], [1024, 1024]),
    "mlp": ([], [800, 800]), "cuda_convnet": ([32, 32, 64], [64]),
}
SWIN_F = {"model.embed_dim": 40, "model.depths": [2, 2, 6, 2], "model.num_heads": [2, 4, 8, 16]}


def test_every_experiment_file_is_in_the_papers_table():
    assert set(EXPERIMENTS) == set(PAPER)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_an_experiment_holds_the_papers_hyper_parameters_and_sweeps_its_table(experiment, tmp_path):
    paper = PAPER[experiment]
    cfg, params = compose_job([f"experiment={experiment}"], tmp_path)
    for key, expected in paper["values"].items():
        got = value(cfg, key)
        if isinstance(expected, float):
            assert got == pytest.approx(expected, rel=1e-9), key
        else:
            assert got == expected, key
    assert {k: v.split(",") for k, v in params.items()} == paper["sweep"]
    if experiment in TABLE_FREE:
        assert cfg.table is None
        return
    spec = TableSpec.from_section(cfg.table)  # check_table: a section the report reads
    # Every row and column key is swept, and every reference label is one of its values.
    for keys, labels in ((spec.rows, spec.reference), (spec.columns, {c for r in spec.reference.values() for c in r})):
        assert all(k in params for k in keys)
        values = [" / ".join(combo) for combo in itertools.product(*(params[k].split(",") for k in keys))]
        assert set(labels) <= set(values), (labels, values)


def test_the_readme_lists_every_experiment_with_its_command_and_what_differs():
    rows = {line.split("|")[1].strip(): line for line in (CONF.parent / "README.md").read_text().splitlines()
            if line.startswith("| `python train.py")}
    for experiment in EXPERIMENTS:
        flag = "" if experiment in TABLE_FREE else "-m "
        row = rows[f"`python train.py {flag}experiment={experiment}`"]
        paper, differs = (cell.strip() for cell in row.split("|")[2:4])
        assert paper and differs


@pytest.mark.parametrize("arm, expected", LIU_ARMS.items())
def test_each_liu_row_is_the_official_readmes_flags(arm, expected, tmp_path):
    cfg, _ = compose_job(["experiment=liu_early_basic", f"arm={arm}"], tmp_path)
    for key, want in {**LIU_RECIPE, **expected}.items():
        assert value(cfg, key) == (pytest.approx(want) if isinstance(want, float) else want), key


@pytest.mark.parametrize("experiment, job", [
    (e, j) for e in EXPERIMENTS for j in PAPER[e].get("jobs", {})
])
def test_a_sweep_job_gets_its_rows_settings(experiment, job, tmp_path):
    """Options a row of the table runs with: config keys (dotted), and the options the
    method is installed with (plain), the model's recommendation where the file leaves a
    value null (gyro's sigma and tau, Liu et al.'s rates)."""
    cfg, _ = compose_job([f"experiment={experiment}", *([job] if job else [])], tmp_path)
    with torch.device("meta"):
        model = build_model(cfg.model, data_info(cfg.data))
    report = apply_method(model, cfg.dropout, seed=0)
    for key, want in PAPER[experiment]["jobs"][job].items():
        if "." in key:
            assert value(cfg, key) == want, key
        else:
            assert report.options[key] == want, key
            if value(cfg, f"dropout.{key}") is None:  # the header says where the value came from
                assert any(key in note and ("recommendation" in note or "default" in note) for note in report.notes)


@pytest.mark.parametrize("model", LIU_RATES)
def test_liu_models_recommend_the_papers_rates_where_a_row_leaves_them_null(model):
    spec, p, drop_rate = LIU_RATES[model]
    info = DataInfo("imagenet", 1000, 3, 224, 0, 0)
    sd = {"name": "stochastic_depth", "drop_rate": None, "mode": "sample", "distribution": "linspace",
          "scaling": "inverted", "seed": None}
    with torch.device("meta"):
        report = apply_method(build_model(OmegaConf.create(spec), info), sd, seed=0)
    assert report.options["p"] == drop_rate  # drop_rate: the old name of stochastic depth's p
    assert any(note.startswith(f"p={drop_rate}: ") and "recommendation" in note for note in report.notes)
    standard = {"name": "standard", "p": None, "sites": ["token", "attn"], "scaling": "inverted"}
    with torch.device("meta"):
        net = build_model(OmegaConf.create(spec), info)
    if p is None:  # the paper prescribes no dropout rate for this model: the null is an error
        with pytest.raises(ConfigError) as err:
            apply_method(net, standard, seed=0)
        assert err.value.key == "dropout.p"
    else:
        assert apply_method(net, standard, seed=0).options["p"] == p
    # A value the config sets wins over the recommendation.
    with torch.device("meta"):
        assert apply_method(build_model(OmegaConf.create(spec), info), {**sd, "drop_rate": 0.2}).options[
            "p"] == 0.2


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_the_models_have_the_papers_sizes(experiment, tmp_path):
    cfg, params = compose_job([f"experiment={experiment}"], tmp_path)
    models = params.get("model", cfg.model.name).split(",")
    for name in models:
        job, _ = compose_job([f"experiment={experiment}", f"model={name}"], tmp_path)
        with torch.device("meta"):
            model = build_model(job.model, data_info(job.data))
        if name in PARAMETERS_M:
            count = sum(p.numel() for p in model.parameters()) / 1e6
            assert count == pytest.approx(PARAMETERS_M[name], rel=0.02), (name, count)
        if name in WIDTHS:
            convs = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
            linears = [m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)]
            assert (convs, linears[:-1]) == WIDTHS[name] and linears[-1] == data_info(job.data).num_classes
        if name == "swin_femto":
            for key, want in SWIN_F.items():
                assert value(job, key) == want


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_the_default_job_of_an_experiment_is_valid(experiment, tmp_path):
    cfg, _ = compose_job([f"experiment={experiment}"], tmp_path)
    validate(checkable(cfg))


def test_the_jobs_refused_before_training_are_the_papers_empty_cells(tmp_path):
    """Liu et al.'s code refuses dropout on ConvNeXt ("-" in their tables); so does regdrop,
    before anything is built, and it takes stochastic depth there."""
    for arm in ("liu_dropout", "liu_early_dropout", "liu_early_sd"):
        cfg, _ = compose_job(["experiment=liu_early_basic", f"arm={arm}", "model=convnext_femto"], tmp_path)
        if arm == "liu_early_sd":
            validate(checkable(cfg))
            continue
        with pytest.raises(ConfigError) as err:  # no dropout rate, no dropout site
            validate(checkable(cfg))
        assert err.value.key == "dropout.p" and "ConvNeXt" in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_job_of_every_sweep_is_valid_but_the_papers_empty_cells(experiment, tmp_path):
    _, params = compose_job([f"experiment={experiment}"], tmp_path)
    refused = []
    seen = set()
    for job in sweep_jobs(params):
        distinct = tuple(o for o in job if not o.startswith("seed="))  # a seed changes no check
        if distinct in seen:
            continue
        seen.add(distinct)
        cfg, _ = compose_job([f"experiment={experiment}", *job], tmp_path)
        try:
            validate(checkable(cfg))
        except ConfigError:
            refused.append(list(distinct))
    assert refused == PAPER[experiment].get("refused", [])


# -- the mini tables: in the regime of their claim ------------------------------------------
# (Their jobs compose, validate and train at smoke size in test_mini_tables.py.)

MINI = sorted(p.stem for p in (CONF / "experiment").glob("mini_*.yaml"))


@pytest.mark.parametrize("experiment", MINI)
def test_a_mini_table_has_a_baseline_a_regime_claims_on_its_own_rows_and_five_seeds(experiment, tmp_path):
    """Every claim and the baseline name a row (and column) the sweep fills, every setting
    (column) with a regime has the baseline row, and each row runs with at least 5 seeds,
    the seed swept first so that the rows alternate in time."""
    cfg, params = compose_job([f"experiment={experiment}"], tmp_path)
    assert list(params)[0] == "seed" and len(params["seed"].split(",")) >= 5
    spec = TableSpec.from_section(cfg.table)
    cells = set()
    for job in sweep_jobs({k: v for k, v in params.items() if k != "seed"}):
        job_cfg, _ = compose_job([f"experiment={experiment}", *job], tmp_path)
        label = " / ".join(str(v) for k in spec.rows if (v := OmegaConf.select(job_cfg, k)) is not None)
        column = " / ".join(str(OmegaConf.select(job_cfg, k)) for k in spec.columns) or None
        cells.add((label, column))
    rows = {label for label, _ in cells}
    assert spec.baseline in rows and spec.regime and spec.claims
    for regime in spec.regime:
        assert regime.needs in ("overfitting", "underfitting")
        assert (spec.baseline, regime.column) in cells, regime
    for claim in spec.claims:
        assert claim.paper and claim.better != claim.than
        assert {(claim.better, claim.column), (claim.than, claim.column)} <= cells, claim


# -- every experiment file trains, at smoke size ------------------------------------------

SMOKE = ["data=synthetic", "data.image_size=16", "data.num_train=64", "data.num_test=32", "data.batch_size=16",
         "trainer=smoke", "trainer.device=cpu", "logger=none"]
TINY = {  # model keys that make each experiment's default model tiny
    "vit_tiny": {"depth": 2, "embed_dim": 48}, "vit_base": {"depth": 2, "embed_dim": 48, "num_heads": 3},
    "resnet18": {"width": 0.125}, "resnet50": {"width": 0.125}, "resnet110": {"width": 0.25},
    "lenet": {"width": 0.125}, "vgg16": {"width": 0.125}, "mlp": {"hidden": [32, 32]},
    "cuda_convnet": {"width": 0.25}, "resnet56": {"width": 0.25},
}


def smoke_config(experiment: str, output_dir: Path, *extra: str) -> DictConfig:
    """The experiment's default job with tiny widths, 4 steps of synthetic data, and its
    cutoffs and warm-ups inside that run."""
    cfg, _ = compose_job([f"experiment={experiment}", *SMOKE, *extra], output_dir)
    with open_dict(cfg):
        for key, small in TINY[cfg.model.name].items():
            cfg.model[key] = small
        if "cutoff_epoch" in cfg.schedule:
            cfg.schedule.cutoff_epoch = 0.5
        if "warmup_epochs" in cfg.schedule:
            cfg.schedule.warmup_epochs = 0.5
        if cfg.lr.name == "cosine":
            cfg.lr.warmup_epochs = 0.5
        if cfg.data.crop_size:
            cfg.data.crop_size = 12  # the 24-of-32 px crops, at the smoke run's 16 px
        if cfg.dropout.name == "dropconnect":
            cfg.dropout.samples = 20  # Gaussian inference draws: few suffice to run it
    return cfg


# Slow on a CPU (ResNet-50/110), or the same code path as a default-suite file with other values.
SLOW_SMOKE = {"huang_resnet110_cifar", "composer_sd_resnet_imagenet", "dropblock_resnet50_imagenet", "liu_early_improved", "gyro_lenet_cifar10",
              "gyro_sigma_tau"}


@pytest.mark.parametrize("experiment", [
    pytest.param(e, marks=pytest.mark.slow) if e in SLOW_SMOKE else e for e in EXPERIMENTS
])
def test_every_experiment_trains_end_to_end_at_smoke_size(experiment, tmp_path):
    cfg = smoke_config(experiment, tmp_path / "run")
    summary = train(cfg)
    assert summary["step"] == 4 and math.isfinite(summary["train/loss"]) and 0 <= summary["test/acc"] <= 1
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["train/acc"] <= 1 for r in steps if "train/acc" in r)


@pytest.mark.slow
def test_one_command_runs_a_whole_table_and_the_report_places_its_cells(tmp_path):
    """`python train.py -m experiment=X` launches the file's sweep (Hydra's basic sweeper
    reads hydra.sweeper.params); the report puts each job in the table's row and column."""
    tiny = [f"model.{k}={v}" for k, v in TINY["resnet18"].items()]
    result = run_cli("-m", "experiment=gyro_resnet18_cifar10", *SMOKE, *tiny, "data.crop_size=12", "seed=0",
                     f"hydra.sweep.dir={tmp_path / 'sweep'}", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = sorted((tmp_path / "sweep").rglob("metrics.json"))
    assert len(summaries) == 2  # dropout=standard,gyro at seed 0
    from regdrop.report import main as report

    assert report([str(tmp_path / "sweep"), "--out", str(tmp_path / "report"), "--no-figures"]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| standard" in text and "| gyro" in text


@pytest.mark.slow
def test_a_run_with_every_recipe_piece_resumes_to_the_same_result(tmp_path):
    """Mixup / CutMix, RandAugment, random erasing and the crops draw from streams seeded by
    the batch's place in the run: a run killed mid epoch resumes to the same weights."""
    from tests.test_resume import RUN, assert_same_run, launch, steps_logged

    recipe = ["loss=mixup_cutmix", "data.augment=true", "data.randaugment=rand-m9-mstd0.5-inc1",
              "data.random_erasing=0.5", "data.crop_size=24"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    done = launch([*RUN, *recipe, f"hydra.run.dir={whole}", f"paths.data_dir={tmp_path}"])
    assert done.returncode == 0, done.stderr[-3000:]
    args = [*RUN, *recipe, f"hydra.run.dir={cut}", f"paths.data_dir={tmp_path}"]
    assert launch(args, stop_at=10).returncode != 0  # killed two steps after the checkpoint at 8
    resumed = launch(args)
    assert resumed.returncode == 0 and "resumed at optimizer step 8" in resumed.stdout
    assert steps_logged(cut) == list(range(18))
    assert_same_run(whole, cut)


# -- the recipe pieces ------------------------------------------------------------------------

LOSS = {"label_smoothing": 0.0, "mixup_alpha": 0.0, "cutmix_alpha": 0.0, "mix_prob": 1.0, "switch_prob": 0.5,
        "mix_mode": "batch"}


def mixer(**options):
    loss = build_loss({**LOSS, **options}, num_classes=10, seed=3)
    assert loss.mix is not None
    return loss


def test_mixup_mixes_each_batch_with_its_reverse_by_the_weight_its_targets_carry():
    loss = mixer(mixup_alpha=0.8)
    x, y = torch.rand(8, 3, 6, 6), torch.arange(8)
    lams = []
    for step in range(300):
        mixed, soft = loss.mix(x.clone(), y, step)
        lam = float(soft[0, 0])  # sample 0 is class 0; its partner, sample 7, class 7
        assert torch.allclose(soft.sum(1), torch.ones(8)) and float(soft[0, 7]) == pytest.approx(1 - lam, abs=1e-6)
        assert torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
        lams.append(lam)
    # lam ~ Beta(0.8, 0.8): mean 1/2, variance 1/(4 (2 alpha + 1)) = 0.0962; 300 draws.
    assert np.mean(lams) == pytest.approx(0.5, abs=0.06)
    assert np.var(lams) == pytest.approx(0.0962, abs=0.025)


def test_cutmix_pastes_one_box_of_the_reversed_batch_whose_area_is_the_targets_weight():
    loss = mixer(cutmix_alpha=1.0)
    x, y = torch.rand(4, 3, 16, 16), torch.arange(4)
    for step in range(50):
        mixed, soft = loss.mix(x.clone(), y, step)
        pasted = (mixed != x).any(1)[0] & (mixed == x.flip(0)).all(1)[0]  # pixels of sample 3 in sample 0
        rows, cols = pasted.any(1).nonzero(), pasted.any(0).nonzero()
        if len(rows):  # one solid box
            assert pasted[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
        assert float(soft[0, 3]) == pytest.approx(float(pasted.float().mean()), abs=1e-6)


def test_mixup_or_cutmix_is_switched_per_batch_with_the_switch_probability():
    loss = mixer(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5)
    x, y = torch.rand(4, 1, 8, 8), torch.arange(4)
    cutmix = 0
    for step in range(400):
        mixed, _ = loss.mix(x.clone(), y, step)
        # CutMix leaves pixels equal to the original; mixup changes every pixel (lam < 1).
        cutmix += bool((mixed == x).any())
    assert abs(cutmix / 400 - 0.5) < 4 * math.sqrt(0.25 / 400)


def test_mixing_is_a_function_of_the_step_and_leaves_the_global_generators_alone():
    loss = mixer(mixup_alpha=0.8, cutmix_alpha=1.0)
    x, y = torch.rand(6, 3, 8, 8), torch.arange(6)
    np.random.seed(7)
    before = np.random.get_state()[1].copy()
    a = loss.mix(x.clone(), y, 5, 1)
    assert np.array_equal(np.random.get_state()[1], before)
    b = loss.mix(x.clone(), y, 5, 1)
    c = loss.mix(x.clone(), y, 6, 1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_label_smoothing_is_timms_and_folds_into_the_mixed_targets():
    logits, y = torch.randn(8, 10), torch.randint(0, 10, (8,))
    smooth = build_loss({**LOSS, "label_smoothing": 0.1}, 10)
    assert smooth.mix is None
    assert float(smooth.fn(logits, y)) == pytest.approx(float(F.cross_entropy(logits, y, label_smoothing=0.1)))
    # Mixing switched off per batch (mix_prob 0): the targets are the smoothed one-hots.
    folded = mixer(mixup_alpha=0.8, label_smoothing=0.1, mix_prob=0.0)
    _, soft = folded.mix(torch.rand(8, 1, 4, 4), y, 0)
    assert torch.allclose(soft.max(1).values, torch.full((8,), 0.9 + 0.01))
    assert torch.allclose(soft.sum(1), torch.ones(8)) and torch.equal(hard_labels(soft), y)
    assert isinstance(folded.fn, SoftTargetCrossEntropy)
    assert float(folded.fn(logits, soft)) == pytest.approx(float(smooth.fn(logits, y)), rel=1e-5)
    assert build_loss(None, 10).fn is F.cross_entropy


def test_bad_loss_values_name_their_key(make_config):
    for override, key in (("loss.label_smoothing=1.0", "loss.label_smoothing"), ("loss.switch_prob=2", "loss.switch_prob"),
                          ("loss.mix_mode=row", "loss.mix_mode"), ("+loss.alpha=1", "loss.alpha")):
        with pytest.raises(ConfigError) as err:
            validate(make_config(override))
        assert err.value.key == key
    with pytest.raises(ConfigError) as err:  # timm's Mixup pairs samples: an even batch
        validate(make_config("loss=mixup_cutmix", "data.batch_size=15"))
    assert err.value.key == "data.batch_size"


def test_soft_targets_reach_the_multi_sample_loss_and_the_accuracy_counts_their_argmax():
    torch.manual_seed(0)
    info = DataInfo("synthetic", 10, 3, 8, 64, 16)
    model = build_model(OmegaConf.create({"name": "lenet", "width": 0.125}), info)
    apply_method(model, {"name": "multisample", "p": 0.5, "samples": 4}, seed=0)
    setup_run(model, 10)
    captured = []
    model.register_forward_hook(lambda module, args, out: captured.append(out.detach()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the step must not move the weights we judge by
    loss = mixer(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    parts = StepParts(model, model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                      torch.amp.GradScaler("cpu", enabled=False), Runtime(torch.device("cpu"), None),
                      grad_accum=2, loss_fn=loss.fn, mix=loss.mix)
    batches = [(torch.rand(8, 3, 8, 8), torch.randint(0, 10, (8,))) for _ in range(2)]
    out = train_step(parts, iter([(x.clone(), y) for x, y in batches]), 7, 1.0)
    expected_loss, expected_correct = 0.0, 0
    for micro, ((x, y), logits) in enumerate(zip(batches, captured, strict=True)):
        assert logits.shape == (4, 8, 10)  # M copies of B x C in training
        _, soft = loss.mix(x.clone(), y, 7, micro)
        per_copy = [SoftTargetCrossEntropy()(logits[m], soft) for m in range(4)]
        expected_loss += float(torch.stack(per_copy).mean()) / 2
        expected_correct += int((predictions(logits).argmax(-1) == soft.argmax(-1)).sum())
    assert float(out.loss) == pytest.approx(expected_loss, rel=1e-5)
    assert int(out.correct) == expected_correct and out.samples == 16


def test_the_learning_rate_is_scaled_from_the_reference_batch_to_the_global_batch(make_config, capsys):
    optim = OmegaConf.create({"name": "adamw", "lr": 4e-3, "betas": [0.9, 0.999], "weight_decay": 0.05,
                              "reference_batch": 4096})
    assert scaled_lr(optim, 4096) == 4e-3 and scaled_lr(optim, 128) == pytest.approx(4e-3 / 32)
    assert build_optimizer(optim, torch.nn.Linear(2, 2), 1024).param_groups[0]["lr"] == pytest.approx(1e-3)
    with open_dict(optim):
        optim.reference_batch = None
    assert build_optimizer(optim, torch.nn.Linear(2, 2), 1024).param_groups[0]["lr"] == 4e-3
    # A run: 16 per batch x 2 micro-batches = 32 global; lr given at 64 -> half of it, logged and announced.
    cfg = make_config("model=lenet", "model.width=0.125", "optim.lr=0.1", "optim.reference_batch=64",
                      "trainer.grad_accum=2", "lr=none")
    train(cfg)
    records = [json.loads(line) for line in (Path(cfg.paths.output_dir) / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if "lr" in r]
    assert len(lrs) == 4 and lrs == pytest.approx([0.05] * 4)
    assert "lr 0.05 (optim.lr 0.1 at reference batch 64, scaled to global batch 32)" in capsys.readouterr().out
    with pytest.raises(ConfigError) as err:
        validate(make_config("optim.reference_batch=0"))
    assert err.value.key == "optim.reference_batch"


@pytest.mark.parametrize("model, spared", [
    (["model=vit_tiny", "model.depth=1", "model.embed_dim=48"], {"pos_embed", "cls_token"}),
    (["model=swin_femto", "model.embed_dim=16", "model.depths=[2,1]", "model.num_heads=[2,4]"],
     {"relative_position_bias_table"}),
])
def test_no_weight_decay_on_norms_biases_and_the_models_own_list(make_config, model, spared):
    """The early-dropout code's parameter groups: one-dimensional parameters and the model's
    ``no_weight_decay()`` (position embedding and class token; Swin's bias tables) get none."""
    cfg = make_config(*model, "optim=adamw")
    net = build_model(cfg.model, data_info(cfg.data))
    optimizer = build_optimizer(cfg.optim, net)
    decay, no_decay = optimizer.param_groups
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    names = {id(p): n for n, p in net.named_parameters()}
    spared_names = {names[id(p)] for p in no_decay["params"]}
    listed = set(net.no_weight_decay())
    assert spared_names == {n for n, p in net.named_parameters() if p.ndim <= 1 or n in listed}
    assert {n.rsplit(".", 1)[-1] for n in spared_names if net.get_parameter(n).ndim > 1} == spared
    assert all(net.get_parameter(n).ndim > 1 for n in (names[id(p)] for p in decay["params"]))
