"""DropConnect: who shares a mask, keep rate and scaling, mean and gaussian inference, surgery."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from regdrop.methods.base import MethodNotApplicable
from regdrop.methods.dropconnect import DropConnectLinear, apply_dropconnect, normal_draws
from regdrop.rng import stream_seed


def five_sigma(p: float, n: int) -> float:
    return 5 * math.sqrt(p * (1 - p) / n)


def layer(p: float = 0.5, inn: int = 6, out: int = 40, bias: bool = False, **kwargs) -> DropConnectLinear:
    torch.manual_seed(0)
    linear = nn.Linear(inn, out, bias=bias)
    nn.init.constant_(linear.weight, 1.0)
    return DropConnectLinear(linear, p, **kwargs).train()


def effective_weights(module: DropConnectLinear, rows: int) -> torch.Tensor:
    """The masked weight each of ``rows`` examples saw, read off with basis-vector inputs.

    Example ``b`` is the basis vector ``e_{b % in}``; the result is ``rows x out``: column
    ``b % in`` of example ``b``'s masked weight.
    """
    eye = torch.eye(module.in_features)
    x = eye[torch.arange(rows) % module.in_features]
    with torch.no_grad():
        return module(x)


# -- masks ----------------------------------------------------------------------------------


def test_batch_mask_is_shared_by_the_whole_batch_and_keeps_one_minus_p() -> None:
    torch.manual_seed(1)
    module = layer(0.3, inn=100, out=200)
    seen = effective_weights(module, rows=200)  # every basis vector twice
    assert torch.equal(seen[:100], seen[100:])  # one mask for the minibatch
    n = 100 * 200
    assert abs((seen[:100] != 0).float().mean().item() - 0.7) < five_sigma(0.3, n)
    survivors = seen[seen != 0]
    assert torch.allclose(survivors, torch.full_like(survivors, 1 / 0.7))
    again = effective_weights(module, rows=100)
    assert not torch.equal(again, seen[:100])  # a fresh mask for the next minibatch


def test_example_masks_differ_per_example_and_are_shared_by_tokens() -> None:
    torch.manual_seed(2)
    module = layer(0.5, inn=4, out=64, per="example")
    x = torch.zeros(6, 5, 4)
    x[..., 0] = 1.0  # every token of every example is e_0
    with torch.no_grad():
        out = module(x)
    assert torch.equal(out, out[:, :1].expand_as(out))  # tokens of an example share its mask
    rows = out[:, 0]
    assert all(not torch.equal(rows[i], rows[j]) for i in range(6) for j in range(i))


@pytest.mark.parametrize(("batch", "groups", "sizes"), [(8, 4, [2, 2, 2, 2]), (7, 3, [3, 2, 2]), (2, 4, [1, 1])])
def test_subbatch_masks_are_shared_within_contiguous_sub_batches(batch, groups, sizes) -> None:
    torch.manual_seed(3)
    module = layer(0.5, inn=3, out=64, per="subbatch", groups=groups)
    x = torch.zeros(batch, 3)
    x[:, 1] = 1.0
    with torch.no_grad():
        rows = module(x)
    blocks = rows.split(sizes)
    for block in blocks:
        assert torch.equal(block, block[:1].expand_as(block))
    firsts = [block[0] for block in blocks]
    assert all(not torch.equal(firsts[i], firsts[j]) for i in range(len(firsts)) for j in range(i))


@pytest.mark.parametrize("per", ["batch", "example", "subbatch"])
def test_bias_is_masked_too(per: str) -> None:
    torch.manual_seed(4)
    module = layer(0.5, inn=2, out=500, bias=True, per=per)
    nn.init.constant_(module.bias, 1.0)
    with torch.no_grad():
        out = module(torch.zeros(4, 2))  # only the bias reaches the output
    assert set(out.unique().tolist()) == {0.0, 2.0}
    assert abs((out != 0).float().mean().item() - 0.5) < five_sigma(0.5, out.numel())


def test_masked_weights_get_no_gradient() -> None:
    torch.manual_seed(5)
    module = layer(0.5, inn=30, out=40)
    x = torch.eye(30)
    out = module(x)
    out.sum().backward()
    seen = out.detach().T  # out x in: the masked weight itself
    assert torch.equal(module.weight.grad != 0, seen != 0)
    assert torch.allclose(module.weight.grad[seen != 0], torch.tensor(2.0))


@pytest.mark.parametrize("per", ["batch", "example", "subbatch"])
def test_expected_output_matches_mean_inference(per: str) -> None:
    torch.manual_seed(6)
    p, inn, out, passes, batch = 0.4, 12, 5, 400, 32
    linear = nn.Linear(inn, out)
    module = DropConnectLinear(linear, p, per=per, groups=4).train()
    v = torch.randn(inn)
    with torch.no_grad():
        draws = torch.cat([module(v.expand(batch, inn)) for _ in range(passes)])
        expected = F.linear(v, linear.weight, linear.bias)
        # Exact variance of one output under inverted masks: p/(1-p) * sum (w v)^2 + b^2.
        variance = p / (1 - p) * (F.linear(v * v, linear.weight**2) + linear.bias**2)
    # Examples of one pass may share a mask, so count passes (not examples) as the samples.
    tolerance = 5 * (variance / passes).sqrt()
    assert ((draws.mean(0) - expected).abs() <= tolerance).all()
    module.eval()
    with torch.no_grad():
        assert torch.equal(module(v.expand(3, inn)), F.linear(v.expand(3, inn), linear.weight, linear.bias))


# -- rate, eval, schedules -------------------------------------------------------------------


@pytest.mark.parametrize("per", ["batch", "example", "subbatch"])
def test_rate_zero_is_exactly_the_plain_layer_and_eval_is_deterministic(per: str) -> None:
    torch.manual_seed(7)
    linear = nn.Linear(10, 7)
    module = DropConnectLinear(linear, 0.5, per=per).train()
    x = torch.randn(9, 3, 10)
    module.set_rate_factor(0.0)
    assert torch.equal(module(x), linear(x))
    module.set_rate_factor(1.0)
    assert not torch.equal(module(x), linear(x))
    module.eval()
    assert torch.equal(module(x), module(x))
    assert torch.equal(module(x), linear(x))


def test_rate_changes_take_effect_without_rebuilding() -> None:
    torch.manual_seed(8)
    module = layer(0.6, inn=100, out=200)
    module.set_rate_factor(0.5)
    seen = effective_weights(module, rows=100)
    assert abs((seen != 0).float().mean().item() - 0.7) < five_sigma(0.3, 20_000)
    assert torch.allclose(seen[seen != 0], torch.tensor(1 / 0.7))


# -- gaussian inference ----------------------------------------------------------------------


def relu_gaussian_mean(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """E[relu(u)] for u ~ N(mean, std^2), in closed form."""
    z = mean / std
    return mean * torch.special.ndtr(z) + std * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def test_gaussian_inference_matches_the_closed_form_of_its_gaussian() -> None:
    torch.manual_seed(9)
    p, samples = 0.5, 20_000
    linear = nn.Linear(32, 16)
    module = DropConnectLinear(linear, p, inference="gaussian", samples=samples, activation=nn.ReLU()).eval()
    v = torch.randn(4, 32)
    with torch.no_grad():
        mean = linear(v)
        std = (p / (1 - p) * (F.linear(v * v, linear.weight**2) + linear.bias**2)).sqrt()
        got = module(v)
    # relu is 1-Lipschitz, so std bounds the spread of relu(u).
    assert ((got - relu_gaussian_mean(mean, std)).abs() <= 5 * std / math.sqrt(samples)).all()


def test_gaussian_inference_is_close_to_monte_carlo_dropconnect() -> None:
    torch.manual_seed(10)
    p, inn, out, examples = 0.5, 64, 8, 10_000
    linear = nn.Linear(inn, out)
    module = DropConnectLinear(linear, p, per="example", inference="gaussian", activation=nn.ReLU())
    v = torch.randn(1, inn)
    with torch.no_grad():
        relu_draws = module.train()(v.expand(examples, inn))  # E[relu((M*W)v)] by fresh masks
        monte_carlo = relu_draws.mean(0)
        spread = relu_draws.std(0)
        got = module.eval()(v)[0]
        mean_inference = linear(v)[0].relu()
    # Both are estimates: examples draws here, `samples` (1000) draws in the layer.
    tolerance = 5 * spread * math.sqrt(1 / examples + 1 / module.samples)
    assert ((got - monte_carlo).abs() <= tolerance).all()
    # And it is a better estimate than relu of the mean (Jensen's gap).
    assert (got - monte_carlo).abs().mean() < 0.25 * (mean_inference - monte_carlo).abs().mean()


def test_gaussian_inference_is_deterministic_and_independent_of_the_batch() -> None:
    torch.manual_seed(11)
    module = DropConnectLinear(nn.Linear(8, 6), 0.5, inference="gaussian", activation=nn.GELU()).eval()
    x = torch.randn(5, 8)
    with torch.no_grad():
        first, second = module(x), module(x)
        alone = module(x[2:3])
    assert torch.equal(first, second)
    assert torch.allclose(alone[0], first[2], atol=1e-6)
    rebuilt = DropConnectLinear(nn.Linear(8, 6), 0.5, inference="gaussian", seed=0)
    assert torch.equal(rebuilt.normal_draws, module.normal_draws)  # a function of the seed only


def test_normal_draws_come_in_antithetic_pairs() -> None:
    draws = normal_draws(7, 3, seed=1)
    assert draws.shape == (7, 3)
    assert torch.equal(draws[4:7], -draws[0:3])


# -- surgery ---------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self, declare: list[str] | None = None) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())
        self.classifier = nn.Sequential(
            nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 3)
        )
        if declare is not None:
            self.regdrop_dropconnect_layers = declare

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def installed(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, DropConnectLinear)]


def test_default_layers_are_all_but_the_classifier_and_parameters_are_reused() -> None:
    model = Net()
    weight = model.classifier[0].weight
    keys = set(model.state_dict())
    report = apply_dropconnect(model, p=0.5)
    assert installed(model) == ["classifier.0", "classifier.2"]
    assert report.counts() == {"Linear -> DropConnectLinear": 2}
    assert model.classifier[0].weight is weight  # an optimizer built before keeps working
    assert set(model.state_dict()) == keys | {"classifier.0.rate", "classifier.2.rate"}
    assert isinstance(model.classifier[1], nn.ReLU)  # mean inference moves no activation
    model.train()(torch.randn(2, 1, 4, 4)).sum().backward()
    assert weight.grad is not None


def test_declared_layers_and_single_linear() -> None:
    model = Net(declare=["classifier.2"])
    apply_dropconnect(model)
    assert installed(model) == ["classifier.2"]
    single = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    apply_dropconnect(single)
    assert installed(single) == ["1"]


def test_gaussian_moves_the_following_activation_into_the_layer() -> None:
    model = Net()
    report = apply_dropconnect(model, inference="gaussian", samples=50)
    assert report.counts() == {
        "Linear -> DropConnectLinear": 2, "ReLU -> Identity": 1, "GELU -> Identity": 1,
    }
    assert isinstance(model.classifier[0].activation, nn.ReLU)
    assert isinstance(model.classifier[2].activation, nn.GELU)
    assert (model.classifier[0].seed, model.classifier[2].seed) == (stream_seed(0, "dropconnect.site", 0),
                                                                   stream_seed(0, "dropconnect.site", 1))
    x = torch.randn(3, 1, 4, 4)
    model.eval()
    assert torch.equal(model(x), model(x))
    for module in model.modules():
        if isinstance(module, DropConnectLinear):
            module.set_rate_factor(0.0)  # gaussian at rate 0 is the plain network
    plain = Net()
    plain.load_state_dict(model.state_dict(), strict=False)
    assert torch.allclose(model(x), plain.eval()(x))


def test_errors_name_the_parameter() -> None:
    with pytest.raises(MethodNotApplicable, match="no nn.Linear"):
        apply_dropconnect(nn.Sequential(nn.Conv2d(1, 1, 1)))
    with pytest.raises(MethodNotApplicable, match="no nn.Linear"):
        apply_dropconnect(nn.MultiheadAttention(4, 2))  # its out_proj is not called
    with pytest.raises(ValueError, match=r"^layers: 'features.0' is a Conv2d"):
        apply_dropconnect(Net(), layers=["features.0"])
    with pytest.raises(ValueError, match=r"^layers: no module named 'nope'"):
        apply_dropconnect(Net(), layers=["nope"])
    with pytest.raises(ValueError, match=r"^layers must name"):
        apply_dropconnect(Net(), layers=[])
    for bad, pattern in [
        ({"p": 1.0}, "^p must"), ({"per": "row"}, "^per must"), ({"groups": 0}, "^groups must"),
        ({"inference": "sample"}, "^inference must"), ({"samples": 0}, "^samples must"),
        ({"seed": 1.5}, "^seed must"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            apply_dropconnect(Net(), **bad)


def test_repr_shows_the_hyper_parameters() -> None:
    text = repr(DropConnectLinear(nn.Linear(3, 2), 0.25, per="subbatch", groups=2))
    assert "in_features=3, out_features=2, bias=True, p=0.25, rate=0.25, per='subbatch', groups=2" in text
    assert "inference='mean', samples=1000, seed=0" in text
