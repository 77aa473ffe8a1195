"""Diagnostics: GDV/GDE against direct computations, measuring leaves training untouched,
MC dropout and calibration against hand computations, the reliability PNG."""

from __future__ import annotations

import copy
import itertools
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from regdrop.data import build_data
from regdrop.diagnostics import (
    Calibration,
    Diagnostics,
    check_diagnostics,
    cosine_distance,
    evaluate_predictions,
    expected_calibration_error,
    gradient_direction_error,
    gradient_direction_variance,
    gyro_members,
    measure_gradients,
    preserved_state,
)
from regdrop.errors import ConfigError
from regdrop.methods import apply_method, begin_step, drop_modules, set_rate_factor
from regdrop.methods.gyro import GyroDropout
from regdrop.methods.multisample import multisample_loss
from regdrop.methods.standard import StandardDropout
from regdrop.models import build_model
from regdrop.train import train
from tests.conftest import CONF, TINY, compose_config

LIU = dict(OmegaConf.to_container(OmegaConf.load(CONF / "diagnostics" / "liu.yaml")))


def tiny_data(channels: int = 1, image_size: int = 16, num_train: int = 256, batch_size: int = 16,
              augment: bool = False):
    cfg = OmegaConf.create({
        "name": "synthetic", "root": "unused", "download": False, "batch_size": batch_size,
        "eval_batch_size": 64, "num_workers": 0, "subset": None, "augment": augment,
        "normalize": False, "channels": channels, "image_size": image_size, "num_classes": 10,
        "num_train": num_train, "num_test": 128, "noise": 1.0,
    })
    return build_data(cfg, seed=0)


def tiny_model(data, model: str = "lenet", dropout: dict | None = None, total_steps: int = 100):
    torch.manual_seed(0)
    net = build_model(OmegaConf.create({"name": model, "width": 0.125}), data.info)
    apply_method(net, OmegaConf.create(dropout or {"name": "standard", "p": 0.5}))
    for module in drop_modules(net):
        module.setup_run(total_steps)
    return net


def direct_cosine_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return 1.0 - float(a @ b) / (float(a.norm()) * float(b.norm()))


# -- pure functions ------------------------------------------------------------------------


def test_cosine_distance_is_exactly_0_1_2_for_identical_orthogonal_and_opposite_vectors():
    g = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    assert float(cosine_distance(g, g.clone())) == 0.0
    assert float(cosine_distance(3.5 * g, 3.5 * g)) == 0.0
    e = torch.eye(4)
    assert float(cosine_distance(e[0], e[1])) == 1.0
    assert float(cosine_distance(e[2], -e[2])) == 2.0
    assert math.isnan(float(cosine_distance(torch.zeros(3), e[0, :3])))
    h = torch.randn(10_000, generator=torch.Generator().manual_seed(1))
    assert float(cosine_distance(g, h)) == pytest.approx(direct_cosine_distance(g, h), abs=1e-12)


def test_gdv_and_gde_of_identical_and_orthogonal_gradients():
    g = torch.randn(5_000, generator=torch.Generator().manual_seed(2))
    same = [g.clone() for _ in range(4)]
    assert gradient_direction_variance(same) == 0.0
    assert gradient_direction_error(same, g.clone()) == 0.0
    basis = list(torch.eye(6)[:5])
    assert gradient_direction_variance(basis) == 1.0
    assert gradient_direction_error(basis[:4], basis[4]) == 1.0
    with pytest.raises(ValueError, match="at least 2"):
        gradient_direction_variance([g])


def test_gdv_and_gde_match_a_direct_computation_on_random_vectors():
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(300, generator=gen) + 0.5 for _ in range(5)]
    ref = torch.randn(300, generator=gen) + 0.5
    pairs = [direct_cosine_distance(a, b) for a, b in itertools.combinations(grads, 2)]
    assert len(pairs) == 10
    assert gradient_direction_variance(grads) == pytest.approx(np.mean(pairs), abs=1e-12)
    assert gradient_direction_error(grads, ref) == pytest.approx(
        np.mean([direct_cosine_distance(g, ref) for g in grads]), abs=1e-12)


# -- gradients of a model ------------------------------------------------------------------


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), StandardDropout(0.5))
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.body(x))


def test_measure_gradients_matches_a_direct_computation_on_a_tiny_model():
    torch.manual_seed(0)
    model = TinyNet()
    gen = torch.Generator().manual_seed(4)
    batches = [(torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(4)]
    reference = [(torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)) for n in (10, 10, 5)]
    initial = [p.detach().clone() - 0.01 for p in model.parameters()]
    got = measure_gradients(model, F.cross_entropy, batches, reference, initial=initial, seed=123)

    # Direct: .backward() on a copy, dropout masks from the same seed, drop layer off for the
    # reference, BatchNorm in training mode throughout.
    twin = copy.deepcopy(model)
    twin.train()
    torch.manual_seed(123)

    def flat_grad(x, y):
        twin.zero_grad()
        F.cross_entropy(twin(x), y).backward()
        return torch.cat([p.grad.flatten() for p in twin.parameters()])

    grads = [flat_grad(x, y) for x, y in batches]
    twin.body[3].eval()
    ref = sum(flat_grad(x, y).double() * len(y) for x, y in reference) / 25
    pairs = [direct_cosine_distance(a, b) for a, b in itertools.combinations(grads, 2)]
    assert got["gdv"] == pytest.approx(np.mean(pairs), abs=1e-6)
    assert got["gde"] == pytest.approx(np.mean([direct_cosine_distance(g, ref) for g in grads]), abs=1e-6)
    assert got["grad_norm"] == pytest.approx(float(torch.stack([g.norm() for g in grads]).mean()), rel=1e-6)
    assert got["reference_grad_norm"] == pytest.approx(float(ref.norm()), rel=1e-6)
    assert got["weight_distance"] == pytest.approx(0.01 * math.sqrt(sum(p.numel() for p in model.parameters())), rel=1e-5)
    # The masks were really drawn: the gradients of one batch differ with another seed.
    assert measure_gradients(model, F.cross_entropy, batches, reference, seed=7)["gdv"] != got["gdv"]


def snapshot(model, data):
    """Everything measuring could disturb."""
    return {
        "state": copy.deepcopy(model.state_dict()),
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state()[1].copy(),
        "generators": [m.generator.get_state() for m in drop_modules(model) if hasattr(m, "generator")],
        "loader": (data.train.epoch, data.train.position),
        "modes": [m.training for m in model.modules()],
    }


def assert_same(before, after):
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        other = after["state"][key]
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, other), key
        else:  # extra state: a dict of tensors and numbers
            assert repr(value) == repr(other), key
    for a, b in zip(before["grads"], after["grads"], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    assert torch.equal(before["torch"], after["torch"])
    assert before["python"] == after["python"]
    assert np.array_equal(before["numpy"], after["numpy"])
    assert all(torch.equal(a, b) for a, b in zip(before["generators"], after["generators"], strict=True))
    assert before["loader"] == after["loader"]
    assert before["modes"] == after["modes"]


@pytest.mark.parametrize("model, dropout", [
    ("lenet", {"name": "gyro", "p": 0.5, "sigma": 8, "tau": 2}),
    ("resnet18", {"name": "stochastic_depth", "drop_rate": 0.5, "mode": "block"}),
    ("lenet", {"name": "multisample", "p": 0.5, "samples": 3}),
])
def test_measure_and_evaluate_leave_model_grads_rngs_and_loader_unchanged(model, dropout, tmp_path):
    data = tiny_data(channels=3, image_size=8 if model == "resnet18" else 16, batch_size=8, augment=True)
    net = tiny_model(data, model, dropout)
    section = {**LIU, "every": 1, "batches": 3, "reference_batches": 2, "mc_samples": 2}
    diag = Diagnostics(section, net, data, seed=5)
    net.train()
    begin_step(net, 3)
    x, y = next(iter(data.train))
    multisample_loss(net(x), y).backward()  # grads and BN statistics that must survive
    before = snapshot(net, data)
    # factor: the drop layers are put in step 4's state (rate, Gyro selection) for the
    # measurement, and back afterwards.
    values = diag.measure(4, net, multisample_loss, factor=0.5)
    assert set(values) == {"diag/gdv", "diag/gde", "diag/grad_norm", "diag/reference_grad_norm",
                           "diag/weight_distance"}
    assert all(math.isfinite(v) for v in values.values()) and 0 < values["diag/gdv"] < 2
    assert_same(before, snapshot(net, data))
    diag.evaluate(net, data.test, tmp_path, max_batches=1)
    assert_same(before, snapshot(net, data))
    if dropout["name"] == "gyro":
        # Measuring is a function of (seed, step, weights, rate): again gives the same numbers.
        assert diag.measure(4, net, multisample_loss, factor=0.5) == values
        assert diag.measure(4, net, multisample_loss, factor=0.0) != values


def run_training(diag_section, steps: int = 8):
    """A few SGD steps of the trainer's loop; measure (when due) before each step begins."""
    data = tiny_data(augment=True)
    net = tiny_model(data, "lenet", {"name": "standard", "p": 0.3}, total_steps=steps)
    diag = Diagnostics(diag_section, net, data, seed=0)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(0)
    losses, measured = [], []
    batches = iter(data.train)
    for step in range(steps):
        factor = 1.0 - step / steps
        if diag.due(step):
            measured.append(diag.measure(step, net, multisample_loss, factor=factor))
        begin_step(net, step, factor)
        x, y = next(batches)
        loss = multisample_loss(net(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, measured


def test_training_losses_are_bit_identical_with_diagnostics_on_and_off():
    off, _ = run_training({"name": "none"})
    on, measured = run_training({**LIU, "every": 2, "batches": 2, "reference_batches": 2})
    assert len(measured) == 4
    assert on == off  # exact float equality, every step


def test_every_until_and_lists_of_steps():
    data = tiny_data()
    net = tiny_model(data)
    every = Diagnostics({**LIU, "every": 50, "until": 120}, net, data)
    assert [s for s in range(300) if every.due(s)] == [0, 50, 100]
    listed = Diagnostics({**LIU, "every": [0, 7, 30], "until": None}, net, data)
    assert [s for s in range(40) if listed.due(s)] == [0, 7, 30]
    off = Diagnostics({"name": "none"}, net, data)
    assert not any(off.due(s) for s in range(10)) and off.evaluate(net, data.test) == {}


# -- MC dropout and calibration --------------------------------------------------------------


def test_mc_dropout_with_one_pass_at_rate_0_equals_the_deterministic_evaluation():
    data = tiny_data()
    net = tiny_model(data)
    set_rate_factor(net, 0.0)
    deterministic = evaluate_predictions(net, data.test)
    mc = evaluate_predictions(net, data.test, samples=1)
    assert (mc.acc, mc.nll) == (deterministic.acc, deterministic.nll)
    for field in ("counts", "confidence", "correct"):
        assert torch.equal(getattr(mc.calibration, field), getattr(deterministic.calibration, field))
    # The deterministic NLL is the test cross-entropy.
    with torch.no_grad():
        logits = torch.cat([net.eval()(x) for x, _ in data.test])
    labels = torch.cat([y for _, y in data.test])
    assert deterministic.nll == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-6)
    # At the peak rate the passes differ, and their average is what MC reports.
    set_rate_factor(net, 1.0)
    mc8 = evaluate_predictions(net, data.test, samples=8, seed=1)
    assert mc8.members == 8 and mc8.nll != deterministic.nll


def test_gyro_subnetworks_tau_and_sigma():
    layer = GyroDropout(0.5, sigma=8, tau=2, width=16, total_steps=8)  # period 2 steps
    model = nn.Sequential(nn.Linear(4, 16), layer, nn.Linear(16, 3))
    layer.begin_step(7)  # period 3: the fourth of sigma / tau = 4
    assert gyro_members(model, "tau") == [[i] for i in layer.selection.tolist()]
    sigma = gyro_members(model, "sigma")
    # One layer, selection without replacement, a full cycle: exactly the bank.
    assert sorted(m[0] for m in sigma) == list(range(8))
    assert sigma[-2:] == gyro_members(model, "tau")
    before = layer.selection.clone()
    result = evaluate_predictions(model, [(torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))],
                                  samples=3, gyro="sigma")
    assert result.members == 8 and torch.equal(layer.selection, before)


def test_ece_matches_a_hand_computation_on_fixed_logits():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(500, 7, generator=gen) * 2
    labels = torch.randint(0, 7, (500,), generator=gen)
    probs = logits.softmax(-1).double().tolist()
    ece = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        members = [(max(p), int(np.argmax(p)) == y) for p, y in zip(probs, labels.tolist(), strict=True)
                   if lo < max(p) <= hi]
        if members:
            confidence = sum(c for c, _ in members) / len(members)
            accuracy = sum(ok for _, ok in members) / len(members)
            ece += abs(accuracy - confidence) * len(members) / 500
    assert expected_calibration_error(logits, labels, bins=15) == pytest.approx(ece, abs=1e-6)
    # A small case by hand: confidences 0.95 (right), 0.95 (wrong), 0.55 (right) in 10 bins:
    # |0.5 - 0.95| * 2/3 + |1 - 0.55| * 1/3 = 0.3 + 0.15.
    calibration = Calibration.empty(10)
    calibration.add(torch.tensor([0.95, 0.95, 0.55], dtype=torch.float64), torch.tensor([True, False, True]))
    assert calibration.ece() == pytest.approx(0.45, abs=1e-12)


def test_evaluate_writes_the_reliability_diagram_and_mc_keys(tmp_path):
    data = tiny_data()
    net = tiny_model(data)
    diag = Diagnostics({**LIU, "mc_samples": 4}, net, data)
    result = diag.evaluate(net, data.test, tmp_path)
    assert set(result) == {"test/ece", "mc/test_acc", "mc/test_nll", "mc/test_ece", "mc/members"}
    assert 0 <= result["test/ece"] <= 1 and result["mc/members"] == 4
    assert (tmp_path / "reliability.png").stat().st_size > 5000


# -- config ----------------------------------------------------------------------------------


def test_option_files_pass_the_checks():
    for path in (CONF / "diagnostics").glob("*.yaml"):
        check_diagnostics(OmegaConf.load(path))


@pytest.mark.parametrize("change, key", [
    ({"batches": 1}, "diagnostics.batches"),
    ({"every": 0}, "diagnostics.every"),
    ({"every": [3, -1]}, "diagnostics.every"),
    ({"mc_samples": -2}, "diagnostics.mc_samples"),
    ({"gyro_subnetworks": "all"}, "diagnostics.gyro_subnetworks"),
    ({"calibration_bins": 0}, "diagnostics.calibration_bins"),
    ({"reference_batch": 3}, "diagnostics.reference_batch"),
])
def test_bad_values_raise_config_errors_naming_the_key(change, key):
    with pytest.raises(ConfigError) as err:
        check_diagnostics({**LIU, **change})
    assert err.value.key == key
    with pytest.raises(ConfigError, match="diagnostics.every"):
        check_diagnostics({"name": "none", "every": 3})


def test_more_batches_than_training_images_is_a_config_error():
    data = tiny_data(num_train=64)
    with pytest.raises(ConfigError, match="diagnostics.batches"):
        Diagnostics({**LIU, "batches": 5}, tiny_model(data), data)


def test_preserved_state_restores_a_replaced_buffer_object():
    model = TinyNet()
    mean = model.body[1].running_mean
    with preserved_state(model):
        model.body[1].running_mean = torch.ones(12)
        torch.rand(3)
    assert model.body[1].running_mean is mean and torch.equal(mean, torch.zeros(12))


# -- in the training loop --------------------------------------------------------------------


def test_train_losses_are_bit_identical_with_diagnostics_on_and_off(tmp_path):
    # An early-dropout schedule: the rate moves at every measured step (1, 2/3, 1/3, 0).
    def losses(*overrides):
        cfg = compose_config([*TINY, "model.width=0.125", "dropout=standard", "schedule=early",
                              "schedule.shape=linear", "schedule.cutoff_epoch=1", "data.augment=true",
                              *overrides], tmp_path / str(len(overrides)))
        summary = train(cfg)
        records = [json.loads(line) for line in (Path(cfg.paths.output_dir) / "metrics.jsonl").open()]
        return summary, records, Path(cfg.paths.output_dir)

    off, off_records, _ = losses()
    on, on_records, folder = losses("diagnostics=liu", "diagnostics.every=1", "diagnostics.batches=2",
                                    "diagnostics.reference_batches=2", "diagnostics.mc_samples=3")
    assert [r["train/loss"] for r in on_records if "train/loss" in r] == \
        [r["train/loss"] for r in off_records if "train/loss" in r]
    assert (on["test/loss"], on["test/acc"]) == (off["test/loss"], off["test/acc"])
    measured = [r for r in on_records if "diag/gdv" in r]
    assert [r["step"] for r in measured] == [0, 1, 2, 3]
    assert {"gap/acc", "gap/loss"} <= set(off) and on["gap/acc"] == off["gap/acc"]
    assert {"test/ece", "mc/test_acc", "mc/test_nll", "mc/test_ece"} <= set(on)
    assert not {"test/ece", "mc/test_acc"} & set(off)
    assert (folder / "reliability.png").stat().st_size > 5000
    # The run ends at rate 0 (early dropout): the MC prediction is the deterministic one.
    assert on["mc/test_acc"] == on["test/acc"] and on["mc/test_nll"] == pytest.approx(on["test/loss"], rel=1e-5)
