"""Drop rates live in tensors, so a compiled model is not recompiled as a schedule moves them."""

import pytest
import torch
import torch._dynamo
from omegaconf import OmegaConf
from torch._dynamo.utils import counters

from regdrop.data import DataInfo
from regdrop.methods import apply_method, begin_step, drop_modules, set_rate_factor
from regdrop.models import build_model
from regdrop.schedules import DropSchedule
from regdrop.train import train
from tests.conftest import TINY_MODELS


@pytest.mark.parametrize("model, dropout", [
    ({"name": "lenet", "width": 0.125}, {"name": "standard", "p": 0.5}),
    ({"name": "lenet", "width": 0.125}, {"name": "gyro", "p": 0.5, "sigma": 8, "tau": 2}),
    ({"name": "vit_tiny", "depth": 2, "embed_dim": 48}, {"name": "stochastic_depth", "drop_rate": 0.3, "mode": "sample"}),
])
def test_early_linear_schedule_triggers_no_recompilation(model, dropout):
    torch._dynamo.reset()
    counters.clear()
    net = build_model(OmegaConf.create(model), DataInfo("x", 10, 3, 32, 64, 64))
    apply_method(net, OmegaConf.create(dropout))
    total = 12
    for module in drop_modules(net):
        module.setup_run(total)
    schedule = DropSchedule(name="early", shape="linear", steps=8)
    compiled = torch.compile(net, backend="eager")
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    graphs_after_warmup = None
    for step in range(total):
        set_rate_factor(net, schedule.factor(step))
        begin_step(net, step)
        torch.nn.functional.cross_entropy(compiled(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1:
            graphs_after_warmup = counters["stats"]["unique_graphs"]
    assert graphs_after_warmup > 0
    assert counters["stats"]["unique_graphs"] == graphs_after_warmup  # rates moved 1 -> 0, no new graph


def compiled_graphs_of_a_run(make_config, epochs: int) -> int:
    torch._dynamo.reset()
    counters.clear()
    cfg = make_config(*TINY_MODELS["lenet"], "trainer.compile=true", "trainer.compile_backend=eager",
                      "trainer.max_steps=null", f"trainer.epochs={epochs}", "data.num_train=48",
                      "schedule=early", "schedule.shape=linear", f"schedule.cutoff_epoch={min(epochs, 2)}")
    cfg.paths.output_dir = f"{cfg.paths.output_dir}-{epochs}"  # another config, another folder
    summary = train(cfg)
    assert summary["step"] == 3 * epochs
    return counters["stats"]["unique_graphs"]


def test_trainer_compiles_once_whatever_the_rate_does(make_config):
    # One epoch compiles the training and evaluation graphs; two more epochs, over which the
    # early-linear rate falls to 0, with two more evaluations, must add none.
    one_epoch = compiled_graphs_of_a_run(make_config, 1)
    three_epochs = compiled_graphs_of_a_run(make_config, 3)
    assert one_epoch > 0
    assert three_epochs == one_epoch
