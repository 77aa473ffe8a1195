"""R-Drop against its definition (Liang et al. 2021, Eq. 3): the loss and its gradient against a
direct computation, the two passes' independent masks, what the trainer runs, and the bases
it refuses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from regdrop.errors import ConfigError
from regdrop.methods import apply_method, check_method, drop_modules, forward_loss
from regdrop.methods.base import DropSite
from regdrop.methods.rdrop import rdrop_loss, symmetric_kl
from tests.methods.test_contract import method_config, tiny


def paper_loss(logits1: torch.Tensor, logits2: torch.Tensor, targets: torch.Tensor, alpha: float) -> torch.Tensor:
    """The paper's Eq. 3 summed over a batch, written out from probabilities:
    -log P1(y) - log P2(y) + alpha/2 * (KL(P1||P2) + KL(P2||P1))."""
    p1, p2 = logits1.softmax(-1), logits2.softmax(-1)
    rows = torch.arange(len(targets))
    nll = -p1[rows, targets].log() - p2[rows, targets].log()
    kl12 = (p1 * (p1.log() - p2.log())).sum(-1)
    kl21 = (p2 * (p2.log() - p1.log())).sum(-1)
    return (nll + alpha / 2 * (kl12 + kl21)).sum()


@pytest.mark.parametrize("alpha", [0.0, 0.3, 5.0])
def test_the_loss_and_its_gradient_are_half_the_papers_eq3_averaged_over_the_batch(alpha):
    torch.manual_seed(0)
    logits1 = torch.randn(16, 10, dtype=torch.float64, requires_grad=True)
    logits2 = torch.randn(16, 10, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 10, (16,))
    ours = rdrop_loss(logits1, logits2, targets, F.cross_entropy, alpha)
    direct = paper_loss(logits1, logits2, targets, alpha) / 2 / len(targets)
    torch.testing.assert_close(ours, direct, rtol=1e-12, atol=1e-12)
    ours_grad = torch.autograd.grad(ours, (logits1, logits2))
    direct_grad = torch.autograd.grad(direct, (logits1, logits2))
    for got, want in zip(ours_grad, direct_grad, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_the_kl_term_is_symmetric_zero_for_equal_passes_and_positive_otherwise():
    torch.manual_seed(1)
    a, b = torch.randn(8, 5), torch.randn(8, 5)
    assert symmetric_kl(a, b) > 0
    torch.testing.assert_close(symmetric_kl(a, b), symmetric_kl(b, a))
    assert symmetric_kl(a, a) == 0
    # Half-precision logits (autocast) are compared in float32.
    assert symmetric_kl(a.half(), b.half()).dtype == torch.float32


def test_soft_targets_go_to_each_pass_loss():
    torch.manual_seed(2)
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    soft = torch.softmax(torch.randn(4, 3), -1)
    want = (F.cross_entropy(a, soft) + F.cross_entropy(b, soft)) / 2 + 0.5 * symmetric_kl(a, b)
    torch.testing.assert_close(rdrop_loss(a, b, soft, F.cross_entropy, 1.0), want)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), DropSite("fc"), nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_the_trainers_forward_runs_two_passes_with_independent_masks_and_the_rdrop_loss():
    net = Net()
    apply_method(net, {"name": "rdrop", "alpha": 2.0, "base_options": {"p": 0.5}}, seed=0)
    net.train()
    x, y = torch.randn(64, 6), torch.randint(0, 4, (64,))
    torch.manual_seed(3)
    logits, loss = forward_loss(net, x, y, F.cross_entropy)
    torch.manual_seed(3)
    first, second = net(x), net(x)
    assert torch.equal(logits, first)
    assert not torch.equal(first, second)  # two sub-models, not one
    torch.testing.assert_close(loss, rdrop_loss(first, second, y, F.cross_entropy, 2.0), rtol=0, atol=0)
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())


def test_at_rate_zero_both_passes_agree_and_the_loss_is_plain_cross_entropy():
    net = Net()
    apply_method(net, {"name": "rdrop", "alpha": 1.0, "base_options": {"p": 0.0}}, seed=0)
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    logits, loss = forward_loss(net, x, y, F.cross_entropy)
    torch.testing.assert_close(loss, F.cross_entropy(logits, y))


def test_the_base_method_is_installed_with_its_options():
    model = tiny("resnet18")
    report = apply_method(model, method_config("rdrop", base="stochastic_depth", base_options={"p": 0.2}), seed=4)
    assert report.method == "rdrop" and report.changes
    # Stochastic depth's linear decay rule: the last block at the base's p.
    assert max(layer.peak for layer in drop_modules(model)) == pytest.approx(0.2)
    assert model.regdrop_method == "rdrop" and model.regdrop_options["alpha"] == 0.3


@pytest.mark.parametrize("base", ["none", "gyro", "multisample", "rdrop", "nonsense"])
def test_a_base_without_two_independent_masks_is_a_config_error_naming_dropout_base(base):
    with pytest.raises(ConfigError) as err:
        check_method({"name": "rdrop", "base": base})
    assert err.value.key == "dropout.base"


def test_bad_base_options_and_a_negative_alpha_name_their_keys():
    with pytest.raises(ConfigError) as err:
        check_method({"name": "rdrop", "base_options": {"p": 1.5}})
    assert err.value.key == "dropout.base_options" and "p" in str(err.value)
    with pytest.raises(ConfigError) as err:
        check_method({"name": "rdrop", "base_options": {"sigma": 4}})
    assert err.value.key == "dropout.base_options" and "sigma" in str(err.value)
    with pytest.raises(ConfigError) as err:
        check_method({"name": "rdrop", "alpha": -1})
    assert err.value.key == "dropout.alpha"


def test_the_documented_command_line_sets_a_base_option(tmp_path):
    # README and the card: `python train.py dropout=rdrop +dropout.base_options.p=0.1`.
    from tests.conftest import compose_config

    cfg = compose_config(["dropout=rdrop", "+dropout.base_options.p=0.1"], tmp_path)
    net = Net()
    report = apply_method(net, cfg.dropout, seed=0)
    assert report.options["base_options"] == {"p": 0.1}
    assert [layer.peak for layer in drop_modules(net)] == [pytest.approx(0.1)]
