"""Spatial dropout: one draw per (sample, channel), both layouts, eval, schedules, surgery."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from regdrop.methods.base import DropSite, MethodNotApplicable, set_rate_factor
from regdrop.methods.spatial import SpatialDropout, apply_spatial_dropout, spatial_dropout


def five_sigma(p: float, n: int) -> float:
    return 5 * math.sqrt(p * (1 - p) / n)


def test_conv_maps_drop_whole_channels() -> None:
    torch.manual_seed(0)
    batch, channels, rate = 100, 200, 0.3
    out = spatial_dropout(torch.ones(batch, channels, 3, 5), torch.tensor(rate), True, channel_axis=1)
    per_channel = out.flatten(2)
    # Every position of a (sample, channel) shares its draw.
    assert torch.equal(per_channel, per_channel[..., :1].expand_as(per_channel))
    kept = (per_channel[..., 0] != 0).float()
    n = batch * channels
    assert abs(kept.mean().item() - (1 - rate)) < five_sigma(rate, n)
    assert torch.allclose(per_channel[..., 0][kept.bool()], torch.tensor(1 / (1 - rate)))
    assert abs(out.mean().item() - 1.0) < five_sigma(rate, n) / (1 - rate)
    # Draws are independent across samples: not one mask for the whole batch.
    assert not torch.equal(kept[0], kept[1])


def test_tokens_share_one_draw_per_sample_and_feature() -> None:
    torch.manual_seed(1)
    batch, tokens, features, rate = 100, 7, 200, 0.5
    layer = SpatialDropout(rate, channel_axis=-1, kind="token").train()
    out = layer(torch.ones(batch, tokens, features))
    assert torch.equal(out, out[:, :1].expand_as(out))  # same for every token
    kept = (out[:, 0] != 0).float()
    assert abs(kept.mean().item() - (1 - rate)) < five_sigma(rate, batch * features)


def test_works_for_any_number_of_spatial_axes_and_keeps_dtype() -> None:
    torch.manual_seed(2)
    out = SpatialDropout(0.5).train()(torch.ones(4, 6, 2, 3, 3, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    flat = out.flatten(2)
    assert torch.equal(flat, flat[..., :1].expand_as(flat))


def test_gradient_is_the_channel_mask() -> None:
    torch.manual_seed(3)
    x = torch.randn(8, 16, 4, 4, requires_grad=True)
    out = spatial_dropout(x, torch.tensor(0.4), True)
    out.sum().backward()
    kept = (out.flatten(2).abs().sum(-1) != 0)[..., None, None].expand_as(x)
    assert torch.allclose(x.grad, kept.float() / 0.6)


def test_rate_zero_eval_and_schedule() -> None:
    torch.manual_seed(4)
    x = torch.randn(8, 4, 5, 5)
    assert torch.equal(spatial_dropout(x, torch.tensor(0.0), True), x)
    assert spatial_dropout(x, torch.tensor(0.5), False) is x
    layer = SpatialDropout(0.5)
    assert layer.eval()(x) is x
    layer.train()
    set_rate_factor(nn.Sequential(layer), 0.0)
    assert layer(x) is x
    set_rate_factor(nn.Sequential(layer), 0.4)  # rate 0.2, same module
    out = layer(torch.ones(400, 100, 2, 2))
    kept = (out[..., 0, 0] != 0).float().mean().item()
    assert abs(kept - 0.8) < five_sigma(0.2, 40_000)


def test_channel_axis_must_not_be_the_batch() -> None:
    with pytest.raises(ValueError, match="^channel_axis"):
        SpatialDropout(0.1, channel_axis=0)
    with pytest.raises(ValueError, match="^channel_axis"):
        spatial_dropout(torch.ones(3, 4), torch.tensor(0.1), True, channel_axis=-2)
    with pytest.raises(ValueError, match="^x must have"):
        spatial_dropout(torch.ones(3), torch.tensor(0.1), True)


def site_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), DropSite("conv"), nn.Dropout2d(0.1), nn.Flatten(2),
        nn.Dropout1d(0.1), DropSite("token"), DropSite("fc"), DropSite("attn"),
    )


def test_apply_sets_the_channel_axis_per_site() -> None:
    model = site_model()
    report = apply_spatial_dropout(model, p=0.2)
    assert report.counts() == {
        "DropSite -> SpatialDropout": 2, "Dropout2d -> SpatialDropout": 1,
        "Dropout1d -> SpatialDropout": 1,
    }
    axes = {n: (m.kind, m.channel_axis) for n, m in model.named_modules() if isinstance(m, SpatialDropout)}
    # torch's Dropout1d/2d drop channels on axis 1 (N x C x L): the replacement keeps that.
    assert axes == {"1": ("conv", 1), "2": ("conv", 1), "4": ("token", 1), "5": ("token", -1)}
    assert isinstance(model[6], DropSite) and isinstance(model[7], DropSite)
    model.train()(torch.randn(2, 3, 6, 6))


def test_errors() -> None:
    with pytest.raises(ValueError, match=r"^sites: \['fc'\] not valid"):
        apply_spatial_dropout(site_model(), sites=["conv", "fc"])
    with pytest.raises(ValueError, match=r"^p must be"):
        apply_spatial_dropout(site_model(), p=-0.1)
    with pytest.raises(MethodNotApplicable, match="no drop site of kind"):
        apply_spatial_dropout(nn.Sequential(nn.Linear(2, 2), DropSite("fc")))


def test_repr_shows_the_hyper_parameters() -> None:
    assert repr(SpatialDropout(0.1, channel_axis=-1, kind="token")) == (
        "SpatialDropout(p=0.1, rate=0.1, channel_axis=-1, kind='token')"
    )


def test_spatial_follows_a_sites_declared_feature_axis() -> None:
    # A token site whose features are on axis 1 (MLP-Mixer's token mixing): channels drop.
    model = nn.Sequential(DropSite("token", feature_axis=1))
    apply_spatial_dropout(model, p=0.5, sites=("token",))
    model.train()
    torch.manual_seed(0)
    y = model(torch.ones(4, 16, 32))
    assert torch.equal(y, y[:, :, :1].expand_as(y))  # constant along the last (token) axis
