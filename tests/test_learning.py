"""Training learns, for every method: a few hundred optimizer steps of the real ``train()``
on the real Fashion-MNIST (the synthetic stand-in, whose classes are fixed prototype images
plus noise, where the Debian package is missing) lower the loss and reach a test accuracy
far above chance (0.1 on 10 classes).

The other fast tests check each method's mechanics and that a run's loss stays finite;
this file checks that a run with the method installed still learns. The methods' own
effect is proven where it is cheap to prove exactly:

* standard: tests/methods/test_standard.py (keeps 1 - p, inverted and original scaling
  agree in expectation)
* spatial: tests/methods/test_spatial.py (whole channels dropped)
* dropconnect: tests/methods/test_dropconnect.py (expected output = mean inference)
* gyro: tests/methods/test_gyro.py (exactly tau masks per period, every mask trained)
* multisample: tests/methods/test_multisample.py (loss = mean of the per-copy losses)
* stochastic depth: tests/methods/test_stochastic_depth.py (a dropped branch is not
  computed; sample mode matches torchvision's statistics)

Thresholds, from one run of these settings on one core (2026-12-05, real Fashion-MNIST;
35 s of CPU time for the eight): the LeNet rows reached test accuracy 0.73-0.80 with the
mean of the last 20 step losses at 0.24-0.39 of the first 20's; the ViT rows (stochastic
depth) 0.62 and 0.59-0.61. The bounds below leave a margin under each.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from regdrop.methods import REGISTRY
from regdrop.train import train
from tests.conftest import FASHION_MNIST_INSTALLED, TINY_MODELS, compose_config

STEPS = 200  # 2 epochs of 100 batches of 32
DATA = (["data=fashion_mnist", "data.subset=3200"] if FASHION_MNIST_INSTALLED else
        ["data=synthetic", "data.channels=1", "data.image_size=28", "data.num_train=3200",
         "data.num_test=1000", "data.eval_batch_size=1000"])
RUN = [*DATA, "data.batch_size=32", "trainer.epochs=2", "trainer.eval_batches=1",  # 1,000 test images
       "trainer.device=cpu", "trainer.threads=1", "trainer.progress=false", "logger=none"]
# The default model (LeNet-like, width 0.125) for every method that installs in it; stochastic
# depth needs residual branches: a two-block ViT (7 px patches, 16 tokens of width 64).
VIT = ["model=vit_tiny", "model.depth=2", "model.embed_dim=64", "model.num_heads=4", "model.patch_size=7",
       "optim=adamw", "optim.lr=2e-3"]
# (overrides, minimum test accuracy, maximum last-20 / first-20 loss ratio)
METHODS = {
    "none": (["dropout=none"], 0.65, 0.5),
    "standard": (["dropout=standard"], 0.65, 0.5),
    "spatial": (["dropout=spatial"], 0.65, 0.5),
    "dropconnect": (["dropout=dropconnect"], 0.65, 0.5),
    "gyro": (["dropout=gyro", "dropout.sigma=64", "dropout.tau=4"], 0.65, 0.5),
    "multisample": (["dropout=multisample", "dropout.samples=4"], 0.65, 0.5),
    "stochastic_depth_block": ([*VIT, "dropout=stochastic_depth", "dropout.mode=block", "dropout.drop_rate=0.2"],
                               0.45, 0.8),
    "stochastic_depth_sample": ([*VIT, "dropout=stochastic_depth", "dropout.mode=sample",
                                 "dropout.drop_rate=0.2"], 0.45, 0.8),
}
# Every registered method named nowhere above, at its config file's values on its declared
# example model (the default model when that is LeNet): a new method is tested without a line
# here, against the residual networks' looser bounds.
EXAMPLES = {"lenet": [], "vit_tiny": VIT}
METHODS.update({name: ([*EXAMPLES.get(method.example_model, TINY_MODELS[method.example_model]), f"dropout={name}"],
                       0.45, 0.8)
                for name, method in REGISTRY.items()
                if not any(f"dropout={name}" in overrides for overrides, _, _ in METHODS.values())})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """One folder for the unpacked data set, shared by the module's runs."""
    return tmp_path_factory.mktemp("data")


@pytest.mark.parametrize("method", METHODS)
def test_a_few_hundred_steps_lower_the_loss_and_reach_an_accuracy_far_above_chance(method, data_dir, tmp_path):
    overrides, min_accuracy, max_loss_ratio = METHODS[method]
    cfg = compose_config([*RUN, *overrides], tmp_path / "run")
    cfg.paths.data_dir = str(data_dir)
    summary = train(cfg)
    assert summary["step"] == STEPS
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == STEPS
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < max_loss_ratio * first, (first, last)
    assert summary["test/acc"] > min_accuracy, summary
