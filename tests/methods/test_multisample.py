"""Multi-sample dropout: the paper's loss, shared weights, per-copy rates, model surgery."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from regdrop.methods.base import DropModule, DropSite, MethodNotApplicable, set_rate_factor
from regdrop.methods.multisample import (
    MultiSampleHead,
    apply_multisample_dropout,
    collapse_copies,
    multisample_dropout,
    multisample_loss,
)


def per_copy_logits(head: nn.Linear, x: torch.Tensor, rates: list[float], seed: int
                    ) -> list[torch.Tensor]:
    """The copies computed one by one, with the masks `MultiSampleHead` draws after ``seed``."""
    torch.manual_seed(seed)
    draws = torch.rand(len(rates), *x.shape)
    return [head(x * (draws[m] >= rate).float() / (1 - rate)) for m, rate in enumerate(rates)]


def test_loss_is_the_mean_of_per_copy_losses_with_the_same_masks():
    torch.manual_seed(0)
    head = nn.Linear(6, 4)
    layer = MultiSampleHead(head, p=0.4, samples=5)
    x, targets = torch.randn(7, 6), torch.randint(0, 4, (7,))
    torch.manual_seed(1)
    logits = layer(x)
    assert logits.shape == (5, 7, 4)
    copies = per_copy_logits(head, x, [0.4] * 5, seed=1)
    for m in range(5):
        torch.testing.assert_close(logits[m], copies[m])
    expected = torch.stack([F.cross_entropy(c, targets) for c in copies]).mean()
    torch.testing.assert_close(multisample_loss(logits, targets), expected)
    # Not the loss of the averaged logits (a common wrong version).
    assert not torch.isclose(multisample_loss(logits, targets),
                             F.cross_entropy(collapse_copies(logits), targets))


def test_copies_share_one_parameter_set_and_gradients_average():
    torch.manual_seed(0)
    head = nn.Linear(6, 4)
    layer = MultiSampleHead(head, p=0.5, samples=4)
    params = list(layer.parameters())
    assert len(params) == 2 and params[0] is head.weight and params[1] is head.bias
    x, targets = torch.randn(9, 6), torch.randint(0, 4, (9,))
    torch.manual_seed(3)
    multisample_loss(layer(x), targets).backward()
    grads = [torch.autograd.grad(F.cross_entropy(c, targets), [head.weight, head.bias])
             for c in per_copy_logits(head, x, [0.5] * 4, seed=3)]
    torch.testing.assert_close(head.weight.grad, torch.stack([g[0] for g in grads]).mean(0))
    torch.testing.assert_close(head.bias.grad, torch.stack([g[1] for g in grads]).mean(0))


def test_eval_is_one_copy_without_dropout():
    head = nn.Linear(6, 4)
    layer = MultiSampleHead(head, p=0.5, samples=8).eval()
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), head(x), rtol=0, atol=0)
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)
    assert collapse_copies(layer(x)).shape == (3, 4)


def test_per_copy_rates_are_respected_and_scale_with_the_schedule():
    features, batch = 50, 400
    head = nn.Linear(features, features)
    with torch.no_grad():
        head.weight.copy_(torch.eye(features))
        head.bias.zero_()
    rates = [0.0, 0.2, 0.5, 0.8]
    layer = MultiSampleHead(head, samples=4, rates=rates)
    x = torch.ones(batch, features)
    torch.manual_seed(0)
    with torch.no_grad():
        out = layer(x)
        n = batch * features
        for copy, rate in zip(out, rates, strict=True):
            dropped = int((copy == 0).sum())
            assert abs(dropped - n * rate) <= 5 * math.sqrt(n * rate * (1 - rate))
            assert torch.allclose(copy[copy != 0], torch.tensor(1 / (1 - rate)))
        torch.testing.assert_close(out[0], x, rtol=0, atol=0)
        set_rate_factor(layer, 0.5)
        out = layer(x)
        for copy, rate in zip(out, rates, strict=True):
            half = rate / 2
            dropped = int((copy == 0).sum())
            assert abs(dropped - n * half) <= 5 * math.sqrt(n * half * (1 - half))


def test_rate_zero_gives_identical_copies():
    x = torch.randn(5, 6)
    copies = multisample_dropout(x, torch.zeros(3))
    torch.testing.assert_close(copies, x.expand(3, 5, 6), rtol=0, atol=0)
    head = nn.Linear(6, 4)
    out = MultiSampleHead(head, p=0.0, samples=3)(x)
    for copy in out:  # the batched matmul may round differently from a 2-D one
        torch.testing.assert_close(copy, head(x))


def test_token_features_and_dtype():
    head = nn.Linear(6, 4).to(torch.bfloat16)
    layer = MultiSampleHead(head, p=0.3, samples=2)
    out = layer(torch.randn(5, 3, 6, dtype=torch.bfloat16))
    assert out.shape == (2, 5, 3, 4) and out.dtype == torch.bfloat16


def test_loss_helpers_on_plain_and_soft_targets():
    logits = torch.randn(3, 5, 4)
    soft = torch.softmax(torch.randn(5, 4), dim=1)
    expected = torch.stack([F.cross_entropy(c, soft) for c in logits]).mean()
    torch.testing.assert_close(multisample_loss(logits, soft), expected)
    targets = torch.randint(0, 4, (5,))
    torch.testing.assert_close(multisample_loss(logits[0], targets),
                               F.cross_entropy(logits[0], targets))
    torch.testing.assert_close(collapse_copies(logits), logits.mean(0))
    torch.testing.assert_close(collapse_copies(logits[0]), logits[0])
    with pytest.raises(ValueError, match="logits"):
        multisample_loss(torch.randn(2, 3, 5, 4), targets)


# --------------------------------------------------------------------------- surgery


def test_resnet18_head_becomes_multisample():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    fc = model.fc
    report = apply_multisample_dropout(model, p=0.5, samples=4)
    assert report.counts() == {"Linear -> MultiSampleHead": 1}
    assert isinstance(model.fc, MultiSampleHead) and model.fc.head is fc
    x, targets = torch.randn(2, 3, 16, 16), torch.tensor([1, 7])
    logits = model(x)
    assert logits.shape == (4, 2, 10)
    multisample_loss(logits, targets).backward()
    assert fc.weight.grad is not None
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 10)


def test_vit_head_dropout_moves_into_the_head():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                              num_classes=10)
    for block in model.blocks:  # regdrop's ViT does the same: its attention dropout is a site
        block.attn.fused_attn = False
    report = apply_multisample_dropout(model, p=0.1, samples=3)
    counts = report.counts()
    assert counts["Dropout -> Identity"] == 1 and isinstance(model.head_drop, nn.Identity)
    assert counts["Linear -> MultiSampleHead"] == 1
    assert counts["Dropout -> StandardDropout"] == 9  # pos_drop + 4 per block
    logits = model(torch.randn(2, 3, 16, 16))
    assert logits.shape == (3, 2, 10)
    multisample_loss(logits, torch.tensor([0, 9])).backward()
    model.eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 16, 16)
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_site_feeding_the_head_is_absorbed_other_sites_get_dropout():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), DropSite("fc"),
                          nn.Linear(16, 16), nn.ReLU(), DropSite("fc"), nn.Linear(16, 3))
    report = apply_multisample_dropout(model, p=0.3, samples=2)
    assert isinstance(model[5], nn.Identity)
    assert isinstance(model[2], DropModule) and model[2].peak == 0.3
    assert isinstance(model[6], MultiSampleHead)
    assert len(report) == 3
    # A site with a parametrized layer between it and the head is not the head's dropout.
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), DropSite("fc"),
                          nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    apply_multisample_dropout(model, sites=("fc",), head="5")
    assert isinstance(model[2], DropModule) and isinstance(model[5], MultiSampleHead)


def test_sites_not_chosen_are_left_alone():
    model = nn.Sequential(nn.Linear(8, 16), DropSite("token"), DropSite("fc"), nn.Linear(16, 3))
    apply_multisample_dropout(model, sites=("fc",))
    assert type(model[1]) is DropSite and isinstance(model[2], nn.Identity)


def test_model_without_linear_is_not_applicable():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten())
    with pytest.raises(MethodNotApplicable, match="nn.Linear"):
        apply_multisample_dropout(model)


@pytest.mark.parametrize("kwargs,name", [
    ({"p": 1.0}, "p"), ({"samples": 0}, "samples"), ({"rates": [0.1, 0.2]}, "rates"),
    ({"rates": [0.1, 1.5], "samples": 2}, "rates"), ({"sites": ("pixel",)}, "sites"),
    ({"head": "1"}, "head"), ({"head": "nope"}, "head"),
])
def test_bad_hyper_parameters_name_themselves(kwargs, name):
    model = nn.Sequential(nn.Linear(8, 16), DropSite("fc"), nn.Linear(16, 3))
    with pytest.raises(ValueError, match=f"^{name}"):
        apply_multisample_dropout(model, **kwargs)


def test_repr_shows_every_hyper_parameter():
    layer = MultiSampleHead(nn.Linear(4, 2), p=0.5, samples=2, rates=[0.25, 0.5])
    text = repr(layer)
    assert "samples=2" in text and "p=0.5" in text and "rates=[0.25, 0.5]" in text
