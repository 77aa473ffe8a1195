"""What every method shares: one re-apply policy, an options check that needs no model and
agrees with the apply function, documented defaults, and a repr that shows the rate in force."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch
from omegaconf import OmegaConf

from regdrop.data import DataInfo
from regdrop.errors import ConfigError
from regdrop.methods import (
    METHODS,
    MethodAlreadyApplied,
    apply_method,
    begin_step,
    check_method,
    drop_modules,
    method_function,
    setup_run,
)
from regdrop.models import build_model
from tests.conftest import CONF

INFO = DataInfo("synthetic", 10, 3, 16, 64, 32)


def tiny(name: str) -> torch.nn.Module:
    cfg = {"resnet18": {"name": "resnet18", "width": 0.125}, "lenet": {"name": "lenet", "width": 0.125}}[name]
    return build_model(OmegaConf.create(cfg), INFO)


def model_for(method: str) -> torch.nn.Module:
    return tiny("resnet18" if method in ("stochastic_depth", "spatial") else "lenet")


def method_config(method: str, **extra) -> dict:
    return {**OmegaConf.to_container(OmegaConf.load(CONF / "dropout" / f"{method}.yaml")), **extra}


@pytest.mark.parametrize("method", list(METHODS))
def test_applying_a_method_twice_is_refused_and_leaves_the_model_as_it_was(method):
    model = model_for(method)
    apply_method(model, method_config(method), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    modules = [type(m) for m in model.modules()]
    with pytest.raises(MethodAlreadyApplied, match="already has"):
        method_function(method)(model)
    with pytest.raises(ConfigError) as err:
        apply_method(model, method_config(method), seed=0)
    assert err.value.key == f"dropout={method}"
    assert [type(m) for m in model.modules()] == modules
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("method", list(METHODS))
def test_check_options_takes_exactly_the_apply_functions_options_and_defaults(method):
    module = importlib.import_module(f"regdrop.methods.{METHODS[method][0]}")
    apply = inspect.signature(method_function(method)).parameters
    check = inspect.signature(module.check_options).parameters
    assert list(check) == [p for p in apply if p != "model"]
    assert {k: p.default for k, p in check.items()} == {k: p.default for k, p in apply.items() if k != "model"}


@pytest.mark.parametrize("method", list(METHODS))
def test_the_config_file_documents_the_functions_defaults(method):
    # conf/dropout/<method>.yaml is the documented default; the functional API must agree,
    # except seeds (null = the run's seed) and values a model recommends (null).
    apply = inspect.signature(method_function(method)).parameters
    for key, value in method_config(method).items():
        if key == "name" or value is None:
            continue
        default = apply[key].default
        assert value == (list(default) if isinstance(default, tuple) else default), key


@pytest.mark.parametrize("method, key, value", [
    ("standard", "p", 1.0), ("spatial", "sites", ["fc"]), ("gyro", "tau", 0),
    ("gyro", "scaling", "average"), ("dropconnect", "per", "row"), ("multisample", "samples", 0),
    ("stochastic_depth", "mode", "layer"), ("gyro", "p", None), ("gyro", "with_replacement", "yes"),
])
def test_check_method_names_the_key_without_a_model(method, key, value):
    with pytest.raises(ConfigError) as err:
        check_method(method_config(method, **{key: value}))
    assert err.value.key == f"dropout.{key}"


def test_gyro_takes_the_models_recommended_sigma_and_tau_unless_set():
    resnet = tiny("resnet18")
    report = apply_method(resnet, method_config("gyro"), seed=0)
    assert (report.options["sigma"], report.options["tau"]) == (1024, 8)
    assert "recommendation" in report.describe_method()
    lenet = tiny("lenet")
    report = apply_method(lenet, method_config("gyro"), seed=0)
    assert (report.options["sigma"], report.options["tau"]) == (256, 16)
    pinned = apply_method(tiny("resnet18"), method_config("gyro", sigma=64, tau=4), seed=0)
    assert (pinned.options["sigma"], pinned.options["tau"]) == (64, 4)
    layers = [m for m in resnet.modules() if type(m).__name__ == "GyroDropout"]
    assert layers and all((m.sigma, m.tau) == (1024, 8) for m in layers)


@pytest.mark.parametrize("method", list(METHODS))
def test_repr_shows_the_peak_and_the_rate_in_force(method):
    model = model_for(method)
    apply_method(model, method_config(method), seed=0)
    setup_run(model, total_steps=100)
    begin_step(model, 0, factor=0.0)  # an early-dropout cutoff: the peak stays, 0 runs
    for module in drop_modules(model):
        text = repr(module)
        assert f"{module.peak:.4g}" in text and "rate=0," in text, text
