"""What every method shares: one declaration in the registry (options = config keys, checked
by a schema the config file uses), one re-apply policy, a check that needs no model, and a
repr that shows the rate in force; and everything that lists methods reads the registry."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from regdrop.data import DataInfo
from regdrop.errors import ConfigError
from regdrop.methods import (
    REGISTRY,
    MethodAlreadyApplied,
    apply_method,
    begin_step,
    check_method,
    drop_modules,
    setup_run,
)
from regdrop.methods.method import Method, schema_name
from regdrop.models import build_model
from regdrop.runtime import Runtime
from tests.conftest import CONF, ROOT, TINY_MODELS, compose_config

METHODS = list(REGISTRY)

INFO = DataInfo("synthetic", 10, 3, 16, 64, 32)


def tiny(name: str) -> torch.nn.Module:
    """Model ``name`` at its config file's values and the tests' small overrides (TINY_MODELS)."""
    cfg = OmegaConf.load(CONF / "model" / f"{name}.yaml")
    for override in TINY_MODELS[name]:
        key, value = override.split("=", 1)
        if key.startswith("model."):
            OmegaConf.update(cfg, key.removeprefix("model."), yaml.safe_load(value))
    return build_model(cfg, INFO)


def model_for(method: str) -> torch.nn.Module:
    return tiny(REGISTRY[method].example_model)


def method_config(method: str, **extra) -> dict:
    """The method's config file as written (its schema's defaults list left out)."""
    written = OmegaConf.to_container(OmegaConf.load(CONF / "dropout" / f"{method}.yaml"))
    written.pop("defaults", None)
    return {**written, **extra}


@pytest.mark.parametrize("method", METHODS)
def test_applying_a_method_twice_is_refused_and_leaves_the_model_as_it_was(method):
    model = model_for(method)
    apply_method(model, method_config(method), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    modules = [type(m) for m in model.modules()]
    with pytest.raises(MethodAlreadyApplied, match="already has"):
        REGISTRY[method].apply(model)
    with pytest.raises(ConfigError) as err:
        apply_method(model, method_config(method), seed=0)
    assert err.value.key == f"dropout={method}"
    assert [type(m) for m in model.modules()] == modules
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def disagreements(declared: Method, written: dict) -> list[str]:
    """Where a config file and its method's options disagree: a key, a default, a type."""
    found = [f"key {key!r} not in the file" for key in declared.option_keys() if key not in written]
    found += [f"key {key!r} not an option" for key in written if key not in declared.option_keys()]
    defaults = declared.defaults()
    for key in set(written) & set(defaults):
        if written[key] != defaults[key] or type(written[key]) is not type(defaults[key]):
            found.append(f"{key}: file {written[key]!r}, options {defaults[key]!r}")
    try:  # the types: the file's values go through the schema
        OmegaConf.merge(OmegaConf.structured(declared.options), written)
    except (ValidationError, ConfigKeyError) as err:
        found.append(str(err).splitlines()[0])
    return found


@pytest.mark.parametrize("method", METHODS)
def test_the_config_file_is_the_methods_options_with_their_defaults_and_uses_the_schema(method):
    written = OmegaConf.to_container(OmegaConf.load(CONF / "dropout" / f"{method}.yaml"))
    assert written.pop("defaults") == [schema_name(method), "_self_"]
    assert written.pop("name") == method
    assert disagreements(REGISTRY[method], written) == []


@pytest.mark.parametrize("change", [
    lambda w: w.pop("p"),  # a key missing
    lambda w: w.update(typo=1),  # a key that is no option
    lambda w: w.update(p=0.25),  # another default
    lambda w: w.update(sites="fc"),  # another type
])
def test_a_config_file_that_disagrees_with_its_options_is_found(change):
    written = method_config("standard")
    written.pop("name")
    change(written)
    assert disagreements(REGISTRY["standard"], written)


def test_a_composed_config_is_typed_by_the_schema(tmp_path):
    with pytest.raises(Exception, match="dropout.samples"):
        compose_config(["dropout=multisample", "dropout.samples=two"], tmp_path)
    cfg = compose_config(["dropout=gyro", "dropout.p=1"], tmp_path)
    assert isinstance(cfg.dropout.p, float)


def test_stochastic_depths_old_drop_rate_is_an_alias_of_p_with_a_warning():
    with pytest.warns(FutureWarning, match="drop_rate is deprecated"):
        report = apply_method(tiny("resnet18"), method_config("stochastic_depth", drop_rate=0.3), seed=0)
    assert report.options["p"] == 0.3 and "drop_rate" not in report.options


def test_the_docs_method_table_lists_every_registered_method():
    text = (ROOT / "docs" / "methods.md").read_text()
    rows = set(re.findall(r"^\| `(\w+)` \|", text, re.M))
    assert rows == {"none", *REGISTRY}


def test_the_benchmark_reads_the_registry(monkeypatch):
    from regdrop.bench.steps import ModelCase, step_comparisons
    from regdrop.methods.standard import METHOD as standard

    monkeypatch.setitem(REGISTRY, "dummy", dataclasses.replace(standard, name="dummy"))
    case = ModelCase("lenet", 1, 28, 8, {"width": 0.125})
    (comparison,), notes = step_comparisons([case], Runtime(torch.device("cpu"), None),
                                            repeats=1, warmup=0, min_time_s=0.0)
    assert "dummy" in comparison.timings and "standard" in comparison.timings, notes


@pytest.mark.parametrize("method, key, value", [
    ("standard", "p", 1.0), ("spatial", "sites", ["fc"]), ("gyro", "tau", 0),
    ("gyro", "scaling", "average"), ("dropconnect", "per", "row"), ("multisample", "samples", 0),
    ("stochastic_depth", "mode", "layer"), ("gyro", "p", None), ("gyro", "with_replacement", "maybe"),
    ("standard", "p", "abc"), ("gyro", "sigma", 1.5), ("standard", "typo", 1),
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


@pytest.mark.parametrize("method", METHODS)
def test_repr_shows_the_peak_and_the_rate_in_force(method):
    model = model_for(method)
    apply_method(model, method_config(method), seed=0)
    setup_run(model, total_steps=100)
    begin_step(model, 0, factor=0.0)  # an early-dropout cutoff: the peak stays, 0 runs
    for module in drop_modules(model):
        text = repr(module)
        assert f"{module.peak:.4g}" in text and "rate=0," in text, text
