"""Every method trains every model it applies to, through the real config tree and trainer."""

import pytest

from regdrop.errors import ConfigError
from regdrop.methods import VALID
from regdrop.train import train
from tests.conftest import TINY_MODELS

RESIDUAL = {"resnet18", "resnet50", "vit_tiny", "mixer"}
SMALL_METHOD = {
    "gyro": ["dropout.sigma=8", "dropout.tau=4"],
    "dropconnect": ["dropout.inference=gaussian", "dropout.samples=16"],
    "multisample": ["dropout.samples=4"],
    "stochastic_depth": ["dropout.drop_rate=0.5"],
}
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
