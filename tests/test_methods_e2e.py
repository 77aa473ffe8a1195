"""Every method trains every model it applies to, through the real config tree and trainer."""

import pytest
import torch
from omegaconf import OmegaConf

from regdrop.data import DataInfo
from regdrop.errors import ConfigError
from regdrop.methods import VALID, apply_method, drop_modules
from regdrop.models import build_model
from regdrop.train import train
from tests.conftest import TINY_MODELS

RESIDUAL = {"resnet18", "resnet50", "resnet101", "resnet56", "resnet110", "vit_tiny", "vit_base",
            "mixer", "mixer_s32", "mixer_b16", "swin_femto", "convnext_femto"}
# Size variants of models in TINY_MODELS (same builder or class, other sizes): the smaller
# model's runs cover their code, so theirs are slow tests.
SIZE_VARIANTS = {
    "vit_base": ["model=vit_base", "model.depth=2", "model.embed_dim=48", "model.num_heads=4"],
    "mixer_s32": ["model=mixer_s32", "model.depth=2", "model.embed_dim=64"],
    "mixer_b16": ["model=mixer_b16", "model.depth=2", "model.embed_dim=64"],
    "resnet101": ["model=resnet101", "model.width=0.125"],
    "resnet110": ["model=resnet110", "model.width=0.25"],
}
MODELS = {**TINY_MODELS, **SIZE_VARIANTS}
# ResNet-56's 27 blocks make a run several times as long as LeNet's: by default it runs only
# its paper's method, stochastic depth (both modes); the other methods are slow tests.
DEFAULT_ONLY = {"resnet56": {"stochastic_depth"}}
# Where the tests know a method must train: stochastic depth on residual models, spatial
# dropout wherever there are conv or token activations (not in an MLP), the others on every
# model. A method not named here (a new one) may refuse a model, clearly (the test below);
# its own test file says where it applies.
MUST_APPLY = {
    "none": set(MODELS), "standard": set(MODELS), "dropconnect": set(MODELS), "gyro": set(MODELS),
    "multisample": set(MODELS), "stochastic_depth": RESIDUAL, "spatial": set(MODELS) - {"mlp"},
}
# Small settings per method, so that the tiny runs exercise every option quickly.
SMALL_OPTIONS = {
    "gyro": {"sigma": 8, "tau": 4},
    "dropconnect": {"inference": "gaussian", "samples": 16},
    "multisample": {"samples": 4},
    "stochastic_depth": {"p": 0.5},
}
SMALL_METHOD = {m: [f"dropout.{k}={v}" for k, v in o.items()] for m, o in SMALL_OPTIONS.items()}


def case(model: str, method: str = "stochastic_depth"):
    """A (model, method) parameter, marked slow for size variants and ResNet-56's extras."""
    slow = model in SIZE_VARIANTS or method not in DEFAULT_ONLY.get(model, {method})
    return pytest.param(model, method, marks=[pytest.mark.slow] if slow else [])


def known_refusal(model: str, method: str) -> bool:
    return method in MUST_APPLY and model not in MUST_APPLY[method]


CASES = [case(m, d) for d in VALID for m in MODELS if not known_refusal(m, d)]


@pytest.mark.parametrize("model, method", CASES)
def test_method_trains_model(make_config, model, method):
    cfg = make_config(*MODELS[model], f"dropout={method}", *SMALL_METHOD.get(method, []))
    try:
        summary = train(cfg)
    except ConfigError as err:
        # Only a method the tests do not know may refuse, and only as a method that has
        # nowhere to go in this model, before anything trains.
        assert method not in MUST_APPLY, f"{method} refused {model}: {err}"
        assert err.key == f"dropout={method}", err
        return
    assert summary["step"] == 4
    assert summary["train/loss"] == summary["train/loss"]  # not NaN


# Block mode (the config's default) runs in CASES; sample mode here, on every residual model.
@pytest.mark.parametrize("model, method", [case(m) for m in MODELS if m in RESIDUAL])
def test_stochastic_depth_sample_mode_trains_model(make_config, model, method):
    cfg = make_config(*MODELS[model], f"dropout={method}", "dropout.mode=sample",
                      *SMALL_METHOD["stochastic_depth"])
    summary = train(cfg)
    assert summary["step"] == 4 and summary["train/loss"] == summary["train/loss"]


@pytest.mark.parametrize("model", ["lenet", "alexnet", "mlp", "cuda_convnet", "vgg16"])
def test_stochastic_depth_needs_residual_blocks(make_config, model):
    with pytest.raises(ConfigError, match="residual"):
        train(make_config(*TINY_MODELS[model], "dropout=stochastic_depth"))


def test_spatial_dropout_needs_conv_or_token_sites(make_config):
    with pytest.raises(ConfigError, match="no drop site"):
        train(make_config(*TINY_MODELS["mlp"], "dropout=spatial"))


def test_surgery_is_printed(make_config, capsys):
    train(make_config(*TINY_MODELS["lenet"], "dropout=gyro", "dropout.sigma=8", "dropout.tau=4"))
    assert "surgery: gyro: 2 x DropSite -> GyroDropout" in capsys.readouterr().out


@pytest.mark.parametrize("method", [m for m in VALID if m != "none"])
def test_surgery_on_a_float64_model_keeps_its_dtype(method):
    # Surgery after .to(dtype): new layers follow the model, and a forward+backward runs.
    model = build_model(OmegaConf.create({"name": "resnet18", "width": 0.125}), DataInfo("x", 10, 3, 16, 8, 8))
    model.to(torch.float64).train()
    report = apply_method(model, OmegaConf.create({"name": method, **SMALL_OPTIONS.get(method, {})}))
    assert len(report) > 0
    for module in drop_modules(model):
        module.setup_run(10)
        module.begin_step(0)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    out = model(torch.randn(4, 3, 16, 16, dtype=torch.float64))
    assert out.dtype == torch.float64
    out.float().sum().backward()
