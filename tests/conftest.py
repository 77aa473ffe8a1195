"""Shared test helpers: compose the real Hydra config tree with overrides, CPU and tiny sizes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

import regdrop  # noqa: F401  registers the dropout methods' schemas, which conf/dropout files use

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
FASHION_MNIST_INSTALLED = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists()

# Tiny, fast settings shared by the end-to-end tests.
TINY_DATA = ["data=synthetic", "data.num_train=64", "data.num_test=32", "data.batch_size=16"]
TINY = ["trainer=smoke", "trainer.device=cpu", "logger=none", *TINY_DATA]
TINY_MODELS = {
    "lenet": ["model=lenet", "model.width=0.125"],
    "alexnet": ["model=alexnet", "model.width=0.125"],
    "resnet18": ["model=resnet18", "model.width=0.125"],
    "resnet50": ["model=resnet50", "model.width=0.125"],
    "vit_tiny": ["model=vit_tiny", "model.depth=2", "model.embed_dim=48"],
    "mixer": ["model=mixer", "model.depth=2", "model.embed_dim=64"],
    # Two stages; the first keeps a shifted-window block.
    "swin_femto": ["model=swin_femto", "model.embed_dim=16", "model.depths=[2,1]",
                   "model.num_heads=[2,4]"],
    "convnext_femto": ["model=convnext_femto", "model.width=0.125", "model.depths=[1,1,1,1]"],
    "resnet56": ["model=resnet56", "model.width=0.25"],
    "mlp": ["model=mlp", "model.hidden=[32,32]"],
    "cuda_convnet": ["model=cuda_convnet", "model.width=0.25"],
    "vgg16": ["model=vgg16", "model.width=0.125"],
}


def compose_config(overrides: list[str], output_dir: Path) -> DictConfig:
    """The config `python train.py <overrides>` would run, writing into ``output_dir``."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.data_dir = str(output_dir / "data")
    return cfg


@pytest.fixture
def make_config(tmp_path):
    def make(*overrides: str) -> DictConfig:
        """The tiny config plus ``overrides``; another ``data=`` replaces the synthetic data."""
        other_data = any(o.startswith("data=") for o in overrides)
        base = [o for o in TINY if not (other_data and o in TINY_DATA)]
        return compose_config([*base, *overrides], tmp_path / "run")

    return make


def run_cli(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python train.py ARGS` in a subprocess, as a user would."""
    full_env = {**os.environ, "WANDB_SILENT": "true", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )
