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

RESIDUAL = {"resnet18", "resnet50", "vit_tiny", "mixer"}
# Small settings per method, so that the tiny runs exercise every option quickly.
SMALL_OPTIONS = {
    "gyro": {"sigma": 8, "tau": 4},
    "dropconnect": {"inference": "gaussian", "samples": 16},
    "multisample": {"samples": 4},
    "stochastic_depth": {"drop_rate": 0.5},
}
SMALL_METHOD = {m: [f"dropout.{k}={v}" for k, v in o.items()] for m, o in SMALL_OPTIONS.items()}
CASES = [(m, d) for d in VALID for m in TINY_MODELS if d != "stochastic_depth" or m in RESIDUAL]


@pytest.mark.parametrize("model, method", CASES)
def test_method_trains_model(make_config, model, method):
    cfg = make_config(*TINY_MODELS[model], f"dropout={method}", *SMALL_METHOD.get(method, []))
    summary = train(cfg)
    assert summary["step"] == 4
    assert summary["train/loss"] == summary["train/loss"]  # not NaN


@pytest.mark.parametrize("mode", ["block", "sample"])
def test_stochastic_depth_modes_train_resnet(make_config, mode):
    assert train(make_config(*TINY_MODELS["resnet18"], "dropout=stochastic_depth", f"dropout.mode={mode}"))["step"] == 4


@pytest.mark.parametrize("model", ["lenet", "alexnet"])
def test_stochastic_depth_needs_residual_blocks(make_config, model):
    with pytest.raises(ConfigError, match="residual"):
        train(make_config(*TINY_MODELS[model], "dropout=stochastic_depth"))


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
