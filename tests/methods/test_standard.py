"""Standard (inverted) dropout: keep rate, scaling, rate 0/1, eval, schedules, compile, surgery."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from regdrop.methods.base import DropSite, MethodNotApplicable, set_rate_factor
from regdrop.methods.standard import (
    StandardDropout,
    apply_standard_dropout,
    dropout,
)


def five_sigma(p: float, n: int) -> float:
    """5 binomial standard deviations of a kept fraction over ``n`` draws."""
    return 5 * math.sqrt(p * (1 - p) / n)


def kept_fraction(out: torch.Tensor) -> float:
    return (out != 0).float().mean().item()


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
def test_keeps_one_minus_rate_and_scales_survivors(rate: float) -> None:
    torch.manual_seed(0)
    n = 200_000
    out = dropout(torch.ones(n), torch.tensor(rate), training=True)
    assert abs(kept_fraction(out) - (1 - rate)) < five_sigma(rate, n)
    survivors = out[out != 0]
    assert torch.allclose(survivors, torch.full_like(survivors, 1 / (1 - rate)))
    # Inverted scaling preserves the expectation: mean = kept / (1 - rate).
    assert abs(out.mean().item() - 1.0) < five_sigma(rate, n) / (1 - rate)


def test_gradient_is_the_mask() -> None:
    torch.manual_seed(1)
    x = torch.randn(64, 32, requires_grad=True)
    out = dropout(x, torch.tensor(0.4))
    out.backward(torch.ones_like(out))
    expected = torch.where(out != 0, torch.full_like(x, 1 / 0.6), torch.zeros_like(x))
    assert torch.allclose(x.grad, expected)


def test_rate_zero_is_exactly_the_identity_and_rate_one_gives_zeros() -> None:
    x = torch.randn(8, 16, requires_grad=True)
    assert torch.equal(dropout(x, torch.tensor(0.0)), x)
    layer = StandardDropout(0.0).train()
    assert layer(x) is x
    zeros = dropout(x, torch.tensor(1.0))
    assert torch.equal(zeros, torch.zeros_like(x))
    zeros.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))  # no 0 * inf NaN in the backward pass


def test_eval_is_the_identity() -> None:
    layer = StandardDropout(0.5).eval()
    x = torch.randn(4, 10)
    assert layer(x) is x
    assert dropout(x, torch.tensor(0.5), training=False) is x


def test_half_precision_keeps_dtype_and_rate() -> None:
    torch.manual_seed(2)
    n = 100_000
    out = StandardDropout(0.3).train()(torch.ones(n, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert abs(kept_fraction(out) - 0.7) < five_sigma(0.3, n)


def test_schedule_moves_the_rate_without_rebuilding() -> None:
    torch.manual_seed(3)
    n = 100_000
    model = nn.Sequential(StandardDropout(0.6)).train()
    x = torch.ones(n)
    set_rate_factor(model, 0.5)
    assert abs(kept_fraction(model(x)) - 0.7) < five_sigma(0.3, n)
    set_rate_factor(model, 0.0)
    assert model(x) is x
    set_rate_factor(model, 1.0)
    assert abs(kept_fraction(model(x)) - 0.4) < five_sigma(0.6, n)


def test_accelerator_path_calls_the_fused_kernel() -> None:
    # On a non-CPU device the layer hands its mirrored float rate to F.dropout; the meta
    # device runs that branch here without a GPU.
    layer = StandardDropout(0.5).train()
    out = layer(torch.empty(3, 4, device="meta"))
    assert out.device.type == "meta" and out.shape == (3, 4)


def test_rate_mirror_follows_every_change_of_the_buffer() -> None:
    layer = StandardDropout(0.5)
    assert layer.rate_value() == 0.5
    layer.set_rate_factor(0.2)  # mirrored without reading the buffer
    assert layer.rate_value() == pytest.approx(0.1) and layer.p == layer.rate_value()
    layer.load_state_dict({"rate": torch.tensor(0.25)})  # copy_ bumps the version counter
    assert layer.rate_value() == 0.25
    layer.rate.fill_(0.0)
    assert layer.rate_value() == 0.0
    layer.to(torch.float64)  # a new buffer object
    layer.rate.fill_(0.3)
    assert layer.rate_value() == pytest.approx(0.3)


def test_schedule_changes_are_mirrored_without_reading_the_buffer(monkeypatch) -> None:
    layer = StandardDropout(0.3).to(torch.bfloat16)  # the buffer rounds the rate
    layer.rate_value()

    def no_device_read(tensor: torch.Tensor) -> float:
        raise AssertionError("the rate buffer was read")

    monkeypatch.setattr(torch.Tensor, "__float__", no_device_read)
    layer.set_rate_factor(0.7)
    assert layer.rate_value() == layer.rate.item()  # exactly what the buffer holds
    monkeypatch.undo()
    layer.rate.fill_(0.5)
    assert layer.rate_value() == 0.5


def test_compiled_layer_is_not_recompiled_when_the_rate_changes() -> None:
    torch._dynamo.reset()
    torch.manual_seed(4)
    n = 50_000
    layer = StandardDropout(0.5).train()
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    x = torch.ones(n)
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert abs(kept_fraction(compiled(x)) - 0.5) < five_sigma(0.5, n)
        layer.set_rate_factor(0.2)
        assert abs(kept_fraction(compiled(x)) - 0.9) < five_sigma(0.1, n)
        layer.set_rate_factor(0.0)
        assert torch.equal(compiled(x), x)


def site_model() -> nn.Module:
    return nn.Sequential(
        DropSite("conv"), nn.Flatten(), nn.Linear(4, 8), DropSite("fc"),
        nn.Sequential(DropSite("token"), DropSite("attn")), nn.Dropout(0.2), nn.Linear(8, 2),
    )


def test_apply_fills_the_chosen_sites_and_reports_them() -> None:
    model = site_model()
    report = apply_standard_dropout(model, p=0.3)
    assert report.counts() == {"DropSite -> StandardDropout": 3, "Dropout -> StandardDropout": 1}
    assert isinstance(model[0], DropSite)  # conv is not a default site
    kinds = {name: m.kind for name, m in model.named_modules() if isinstance(m, StandardDropout)}
    assert kinds == {"3": "fc", "4.0": "token", "4.1": "attn", "5": "fc"}
    assert all(m.peak == 0.3 for m in model.modules() if isinstance(m, StandardDropout))
    model.train()(torch.randn(5, 1, 2, 2))


def test_apply_works_on_a_foreign_timm_model() -> None:
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    report = apply_standard_dropout(vit, p=0.1)
    assert len(report) == len([m for m in vit.modules() if isinstance(m, StandardDropout)]) > 0
    out = vit.train()(torch.randn(2, 3, 16, 16))  # fused attention reads attn_drop.p
    assert out.shape == (2, 10)


def test_errors_name_the_parameter() -> None:
    with pytest.raises(ValueError, match=r"^p must be"):
        apply_standard_dropout(site_model(), p=1.0)
    with pytest.raises(ValueError, match=r"^sites"):
        apply_standard_dropout(site_model(), sites=["fc", "bogus"])
    with pytest.raises(ValueError, match=r"^sites must name"):
        apply_standard_dropout(site_model(), sites=[])
    with pytest.raises(MethodNotApplicable, match="no drop site of kind"):
        apply_standard_dropout(nn.Sequential(nn.Linear(2, 2), DropSite("conv")))


def test_repr_shows_the_hyper_parameters() -> None:
    assert repr(StandardDropout(0.25, kind="token")) == (
        "StandardDropout(p=0.25, rate=0.25, kind='token', scaling='inverted')")
    assert "scaling='test_time'" in repr(StandardDropout(0.25, scaling="test_time"))


# -- scaling="test_time": the paper's original form ----------------------------------------


@pytest.mark.parametrize("rate", [0.2, 0.5, 0.8])
def test_both_scalings_agree_in_expectation(rate: float) -> None:
    """E[training output] equals the evaluation output in both forms: x for inverted,
    x * (1 - p) for test_time; so the two networks differ only by a constant factor."""
    torch.manual_seed(5)
    n = 200_000
    x = torch.rand(n) + 0.5  # not all ones: survivors must keep their own values
    tolerance = 5 * (x.std().item() + x.mean().item()) * math.sqrt(rate / (1 - rate) / n)
    for scaling, eval_factor in (("inverted", 1.0), ("test_time", 1 - rate)):
        layer = StandardDropout(rate, scaling=scaling)
        train_out = layer.train()(x)
        eval_out = layer.eval()(x)
        assert torch.allclose(eval_out, x * eval_factor)
        assert abs(train_out.mean().item() - eval_out.mean().item()) < tolerance * eval_factor
        assert abs(kept_fraction(train_out) - (1 - rate)) < five_sigma(rate, n)
    survivors = StandardDropout(rate, scaling="test_time").train()(x)
    kept = survivors != 0
    assert torch.equal(survivors[kept], x[kept])  # no scaling in training


def test_test_time_eval_scales_by_the_rate_in_force() -> None:
    layer = StandardDropout(0.6, scaling="test_time").eval()
    x = torch.randn(4, 8, dtype=torch.float64)
    assert torch.allclose(layer(x), x * 0.4)
    layer.set_rate_factor(0.5)  # a schedule halves the rate: eval follows it
    assert torch.allclose(layer(x), x * (1 - 0.3))
    assert layer(x).dtype == torch.float64
    layer.set_rate_factor(0.0)  # early dropout switched off: evaluation is unscaled
    assert layer(x) is x
    assert layer.train()(x) is x


def test_test_time_functional_form_and_gradient() -> None:
    torch.manual_seed(6)
    x = torch.randn(64, 32, requires_grad=True)
    out = dropout(x, torch.tensor(0.4), inverted=False)
    out.backward(torch.ones_like(out))
    assert torch.equal(x.grad, (out != 0).float())  # the mask itself, unscaled
    assert torch.allclose(dropout(x, 0.4, training=False, inverted=False), x * 0.6)


def test_test_time_compiled_layer_is_not_recompiled_when_the_rate_changes() -> None:
    torch._dynamo.reset()
    torch.manual_seed(7)
    n = 50_000
    layer = StandardDropout(0.5, scaling="test_time")
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    x = torch.ones(n)
    with torch._dynamo.config.patch(error_on_recompile=True):
        layer.train()
        assert abs(compiled(x).mean().item() - 0.5) < five_sigma(0.5, n)
        layer.set_rate_factor(0.2)
        assert abs(compiled(x).mean().item() - 0.9) < five_sigma(0.1, n)
    layer.eval()
    assert torch.allclose(compiled(x), x * 0.9)


def test_apply_sets_the_scaling_and_the_paper_form_is_the_same_net_scaled() -> None:
    torch.manual_seed(8)
    paper = site_model()
    inverted = copy.deepcopy(paper)
    apply_standard_dropout(paper, p=0.3, scaling="test_time")
    apply_standard_dropout(inverted, p=0.3)
    layers = [m for m in paper.modules() if isinstance(m, StandardDropout)]
    assert len(layers) == 4 and all(m.scaling == "test_time" for m in layers)
    # In evaluation the hidden features pass 4 drop sites in a row, each x 0.7; the last
    # Linear then sees 0.7^4 times the features of the inverted network.
    x = torch.randn(5, 1, 2, 2)
    bias = paper[-1].bias
    assert torch.allclose(paper.eval()(x) - bias, 0.7**4 * (inverted.eval()(x) - bias),
                          atol=1e-6)
    with pytest.raises(ValueError, match=r"^scaling must be one of"):
        apply_standard_dropout(site_model(), scaling="original")
    with pytest.raises(ValueError, match=r"^scaling must be one of"):
        StandardDropout(0.5, scaling="original")


def test_config_scaling_reaches_the_layers_and_a_bad_one_names_the_key() -> None:
    from regdrop.errors import ConfigError
    from regdrop.methods import apply_method

    model = site_model()
    apply_method(model, {"name": "standard", "p": 0.5, "sites": ["fc"], "scaling": "test_time"})
    assert {m.scaling for m in model.modules() if isinstance(m, StandardDropout)} == {"test_time"}
    with pytest.raises(ConfigError) as err:
        apply_method(site_model(), {"name": "standard", "p": 0.5, "scaling": "original"})
    assert err.value.key == "dropout.scaling" and "test_time" in str(err.value)
