"""The training loop's own behaviour, tested directly: what the layers ran with, one method
step per optimizer step, accumulation, the summary, the epoch order, the LR sequence, seeds,
validation before any data is read, and no host read between logged steps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import regdrop.data.sources
import regdrop.train
from regdrop.data import DataInfo, TensorLoader
from regdrop.errors import ConfigError
from regdrop.methods import apply_method, begin_step, setup_run
from regdrop.methods.gyro import GyroDropout
from regdrop.methods.standard import StandardDropout
from regdrop.models import build_model
from regdrop.runtime import Runtime
from regdrop.train import StepParts, train, train_step
from tests.conftest import TINY_MODELS, compose_config

LENET = TINY_MODELS["lenet"]


def records(cfg, kind: str) -> list[dict]:
    lines = (Path(cfg.paths.output_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if kind in r]


# -- validation ------------------------------------------------------------------------


BAD = [
    (["seed=-1"], "seed"), (["seed=12345678901"], "seed"), (["optimized_metric=best/tset_acc"], "optimized_metric"),
    (["data.batch_size=0"], "data.batch_size"), (["data.augment=maybe"], "data.augment"),
    (["model.width=abc"], "model"), (["+model.depth=3"], "model.depth"),
    (["dropout.p=1.5"], "dropout.p"), (["dropout=gyro", "dropout.tau=0"], "dropout.tau"),
    (["dropout=stochastic_depth"], "dropout=stochastic_depth"),  # lenet has no residual blocks
    (["schedule=early", "schedule.shape=cosine"], "schedule.shape"),
    (["optim.momentum=-1"], "optim.momentum"), (["lr=multistep", "lr.milestones=[1,abc]"], "lr.milestones"),
    (["trainer.grad_accum=0"], "trainer.grad_accum"), (["trainer.precision=fp8"], "trainer.precision"),
    (["trainer.compile=true", "trainer.compile_backend=inductr"], "trainer.compile_backend"),
    (["logger=wandb", "logger.mode=sometimes"], "logger.mode"), (["+logger.typo=1"], "logger.typo"),
]


@pytest.mark.parametrize("overrides, key", BAD)
def test_every_bad_value_is_reported_before_any_data_is_read(make_config, monkeypatch, overrides, key):
    def touched(*args, **kwargs):
        raise AssertionError("the data was read before the config was checked")

    for loader in ("_synthetic", "_fashion_mnist", "_cifar", "_imagenet"):
        monkeypatch.setattr(regdrop.data.sources, loader, touched)
    monkeypatch.setattr(regdrop.train, "build_data", touched)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with pytest.raises(ConfigError) as err:
        train(make_config(*LENET, *overrides))
    assert err.value.key == key


# -- seeds -------------------------------------------------------------------------------


def method_state(run_seed: int, pin: int | None = None) -> dict[str, torch.Tensor]:
    """Gyro banks and selections, block gates and DropConnect draws of a run's surgery."""
    state = {}
    info = DataInfo("synthetic", 10, 3, 16, 64, 32)
    for method, model_name, options in (
        ("gyro", "lenet", ["dropout.sigma=16", "dropout.tau=4"]),
        ("stochastic_depth", "resnet18", ["dropout.mode=block", "dropout.drop_rate=0.5"]),
        ("dropconnect", "lenet", ["dropout.inference=gaussian", "dropout.samples=10"]),
    ):
        cfg = compose_config([f"dropout={method}", f"model={model_name}", "model.width=0.125",
                              f"seed={run_seed}", *options, *([f"dropout.seed={pin}"] if pin is not None else [])],
                             Path("unused"))
        model = build_model(cfg.model, info)
        apply_method(model, cfg.dropout, seed=cfg.seed)
        setup_run(model, total_steps=8)
        if method == "gyro":
            begin_step(model, 0)
            model.train()(torch.zeros(4, 3, 16, 16))  # draws the bank
            selections = []
            for step in range(8):
                begin_step(model, step)
                selections.append(torch.cat([m.selection.clone() for m in model.modules() if isinstance(m, GyroDropout)]))
            state["gyro bank"] = torch.cat([m.scores.flatten() for m in model.modules() if isinstance(m, GyroDropout)])
            state["gyro selection"] = torch.stack(selections)
        elif method == "stochastic_depth":
            model.train()
            gates = [m for m in model.modules() if type(m).__name__ == "BranchGate"]
            state["block gates"] = torch.tensor([[g.keep() for g in gates] for _ in range(20)])
        else:
            draws = [b for name, b in model.named_buffers() if name.endswith("normal_draws")]
            state["dropconnect draws"] = torch.cat([d.flatten() for d in draws])
    return state


def test_the_run_seed_reaches_every_methods_random_streams_unless_pinned():
    zero, one = method_state(0), method_state(1)
    assert zero.keys() == one.keys() == {"gyro bank", "gyro selection", "block gates", "dropconnect draws"}
    for key in zero:
        assert not torch.equal(zero[key], one[key]), f"{key} is the same for seed=0 and seed=1"
    again = method_state(0)
    for key in zero:
        assert torch.equal(zero[key], again[key]), f"{key} is not reproducible"


def test_an_explicit_dropout_seed_pins_the_methods_whatever_the_run_seed():
    zero, one = method_state(0, pin=7), method_state(1, pin=7)
    for key in zero:
        assert torch.equal(zero[key], one[key]), f"{key} changed with the run seed despite dropout.seed"
    assert not torch.equal(zero["gyro bank"], method_state(0, pin=8)["gyro bank"])


# -- train_step --------------------------------------------------------------------------


def lenet_parts(grad_accum: int = 1, method: str = "none") -> StepParts:
    torch.manual_seed(0)
    info = DataInfo("synthetic", 4, 1, 8, 64, 16)
    model = build_model(OmegaConf.create({"name": "lenet", "width": 0.125}), info)
    apply_method(model, {"name": method} if method == "none" else {"name": method, "p": 0.5}, seed=0)
    setup_run(model, 100)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return StepParts(model, model, optimizer, schedule, torch.amp.GradScaler("cpu", enabled=False),
                     Runtime(torch.device("cpu"), None), grad_accum=grad_accum)


def test_accumulated_micro_batches_equal_one_large_batch():
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 4, (16,))
    whole, split = lenet_parts(1), lenet_parts(2)
    out_whole = train_step(whole, iter([(x, y)]), 0, 1.0)
    out_split = train_step(split, iter([(x[:8], y[:8]), (x[8:], y[8:])]), 0, 1.0)
    assert torch.allclose(out_whole.loss, out_split.loss, atol=1e-6)
    assert out_whole.samples == out_split.samples == 16 and int(out_whole.correct) == int(out_split.correct)
    for a, b in zip(whole.model.parameters(), split.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_a_step_begins_the_methods_once_with_its_step_and_rate(monkeypatch):
    calls, rates = [], []
    monkeypatch.setattr(StandardDropout, "begin_step", lambda self, step: calls.append(step))
    original = StandardDropout.forward

    def forward(self, x):
        rates.append(self.rate_value())
        return original(self, x)

    monkeypatch.setattr(StandardDropout, "forward", forward)
    parts = lenet_parts(grad_accum=3, method="standard")
    batches = iter([(torch.randn(4, 1, 8, 8), torch.randint(0, 4, (4,)))] * 3)
    train_step(parts, batches, 5, 0.25)
    assert calls == [5, 5]  # once per layer (two sites), not once per micro-batch
    assert rates == [0.125] * 6  # what the layers ran with: 0.25 x peak 0.5, all 3 micro-batches


# -- the whole loop ----------------------------------------------------------------------


def test_methods_get_the_whole_runs_length_and_every_step_once_with_the_logged_rate(make_config, monkeypatch):
    setups, begins, used = [], [], []
    original_setup = GyroDropout.setup_run
    monkeypatch.setattr(GyroDropout, "setup_run", lambda self, n, *a: (setups.append(n), original_setup(self, n, *a)))
    original_begin, original_forward = GyroDropout.begin_step, GyroDropout.forward

    def begin(self, step):
        begins.append(step)
        original_begin(self, step)

    def forward(self, x):
        if self.training:
            used.append((self._step, self.rate_value()))
        return original_forward(self, x)

    monkeypatch.setattr(GyroDropout, "begin_step", begin)
    monkeypatch.setattr(GyroDropout, "forward", forward)
    cfg = make_config(*LENET, "dropout=gyro", "dropout.sigma=8", "dropout.tau=2", "data.num_train=96",
                      "data.batch_size=8", "trainer.grad_accum=2", "trainer.epochs=3", "trainer.max_steps=null",
                      "schedule=early", "schedule.shape=linear", "schedule.cutoff_epoch=1.5", "trainer.log_every=4")
    train(cfg)
    total = 3 * (96 // 16)
    layers = 2
    assert setups == [total] * layers
    assert begins == [s for s in range(total) for _ in range(layers)]
    logged = {r["step"]: r["train/drop_rate"] for r in records(cfg, "train/drop_rate")}
    assert sorted(logged) == list(range(total))
    # every micro-batch of step s ran at the rate logged for step s
    assert len(used) == total * 2 * layers
    for step, rate in used:
        assert rate == pytest.approx(logged[step], abs=1e-7)


def test_the_summary_keeps_the_best_and_the_last_evaluation(make_config, monkeypatch):
    scripted = iter([0.5, 0.9, 0.7])
    monkeypatch.setattr(regdrop.train, "evaluate",
                        lambda *a, **k: {"test/loss": 1.0, "test/acc": next(scripted)})
    cfg = make_config(*LENET, "trainer.epochs=3", "trainer.max_steps=null")
    summary = train(cfg)
    assert summary["best/test_acc"] == 0.9 and summary["test/acc"] == 0.7
    assert [r["best/test_acc"] for r in records(cfg, "test/acc")] == [0.5, 0.9, 0.9]


def test_each_epoch_sees_every_sample_once_in_a_new_order(make_config, monkeypatch):
    orders = []
    original = TensorLoader.__iter__

    def spy(self):
        labels = []
        orders.append(labels)
        for x, y in original(self):
            labels.append(y)
            yield x, y

    monkeypatch.setattr(TensorLoader, "__iter__", spy)
    cfg = make_config(*LENET, "trainer.epochs=3", "trainer.max_steps=null", "trainer.eval_every=10")
    train(cfg)
    # the labels of the synthetic set are random, so the sequence of labels tells the order
    train_orders = [torch.cat(o) for o in orders if o and len(torch.cat(o)) == 64]
    assert len(train_orders) == 3
    for a in range(3):
        for b in range(a + 1, 3):
            assert not torch.equal(train_orders[a], train_orders[b])
        assert torch.equal(train_orders[a].sort().values, train_orders[0].sort().values)


def test_the_learning_rate_follows_warmup_then_cosine_step_by_step(make_config):
    cfg = make_config(*LENET, "trainer.epochs=3", "trainer.max_steps=null", "lr.warmup_epochs=1.5",
                      "lr.warmup_start_factor=0.1", "optim.lr=0.2")
    train(cfg)
    logged = [r["lr"] for r in records(cfg, "lr")]
    per_epoch, total = 4, 12
    warmup = 6  # 1.5 epochs x 4 steps
    expected = [0.2 * (0.1 + 0.9 * s / warmup) if s < warmup
                else 0.2 * 0.5 * (1 + np.cos(np.pi * (s - warmup) / (total - warmup))) for s in range(total)]
    assert per_epoch * 3 == len(logged) == total
    np.testing.assert_allclose(logged, expected, rtol=1e-12)


# -- no host sync ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["standard", "gyro"])
def test_no_host_read_between_logged_steps(make_config, monkeypatch, method):
    reads, allowed = [], [False]
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            if not allowed[0]:
                reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    # Reading the device is allowed when logging, evaluating and checkpointing, not in between.
    for owner, name in ((regdrop.train.StepLog, "flush"), (regdrop.train, "evaluate"),
                        (regdrop.train, "checkpoint")):
        original = getattr(owner, name)

        def permitted(*args, _original=original, **kwargs):
            allowed[0] = True
            try:
                return _original(*args, **kwargs)
            finally:
                allowed[0] = False

        monkeypatch.setattr(owner, name, permitted)
    original_step = regdrop.train.train_step
    steps = []

    def step(*args, **kwargs):
        reads_before = len(reads)
        out = original_step(*args, **kwargs)
        steps.append(len(reads) - reads_before)
        return out

    monkeypatch.setattr(regdrop.train, "train_step", step)
    extra = ["dropout.sigma=8", "dropout.tau=2"] if method == "gyro" else []
    cfg = make_config(*LENET, f"dropout={method}", *extra, "trainer.epochs=2", "trainer.max_steps=null",
                      "trainer.log_every=3")
    train(cfg)
    assert len(steps) == 8 and steps == [0] * 8
    assert reads == [], f"host reads outside the log flushes and evaluations: {reads}"
    assert len(records(cfg, "train/loss")) == 8  # every step still has its record


def test_train_is_at_most_60_lines_and_no_function_of_the_loop_takes_more_than_four_parameters():
    # The loop reads top to bottom like nanoGPT's; its state travels in a Run, not in long
    # argument lists (methods count self).
    import inspect

    import regdrop.checkpoint

    assert len(inspect.getsource(train).splitlines()) <= 60
    for module in (regdrop.train, regdrop.checkpoint):
        functions = [f for _, f in inspect.getmembers(module, inspect.isfunction) if f.__module__ == module.__name__]
        classes = [c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == module.__name__]
        functions += [f for c in classes for f in vars(c).values()
                      if inspect.isfunction(f) and f.__module__ == module.__name__]
        assert functions
        wide = {f.__qualname__: len(inspect.signature(f).parameters) for f in functions
                if len(inspect.signature(f).parameters) > 4 and f.__name__ != "__init__"}
        assert not wide, wide
