"""Every model adapts to its data and declares its drop sites and residual blocks."""

import pytest
import torch
from timm.models.mlp_mixer import MixerBlock
from timm.models.vision_transformer import Block
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from regdrop.data import DataInfo
from regdrop.methods.base import DropSite, find_sites
from regdrop.models import MODELS
from regdrop.models.vit import patch_size_for

SMALL = {
    "lenet": {"width": 0.125},
    "alexnet": {"width": 0.125},
    "resnet18": {"width": 0.125},
    "resnet50": {"width": 0.125},
    "vit_tiny": {"depth": 2, "embed_dim": 48},
    "mixer": {"depth": 2, "embed_dim": 64},
}
BLOCKS = {"resnet18": BasicBlock, "resnet50": Bottleneck, "vit_tiny": Block, "mixer": MixerBlock}
SITE_KINDS = {
    "lenet": {"fc", "conv"},
    "alexnet": {"fc", "conv"},
    "resnet18": {"fc", "conv"},
    "resnet50": {"fc", "conv"},
    "vit_tiny": {"fc", "token", "attn"},
    "mixer": {"fc", "token"},
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("channels, size, classes", [(1, 28, 10), (3, 32, 100)])
def test_model_adapts_to_channels_size_and_classes(name, channels, size, classes):
    model = MODELS[name](DataInfo("x", classes, channels, size, 10, 10), **SMALL[name])
    out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, classes)
    out.sum().backward()  # trainable end to end


@pytest.mark.parametrize("name", list(MODELS))
def test_model_declares_its_sites_and_blocks(name):
    model = MODELS[name](DataInfo("x", 10, 3, 32, 10, 10), **SMALL[name])
    kinds = {m.kind for _, m in find_sites(model)}
    assert kinds == SITE_KINDS[name]
    assert not any(type(m) is nn.Dropout for m in model.modules())  # all dropouts are sites
    blocks = [m for m in model.modules() if isinstance(m, tuple(BLOCKS.values()))]
    assert bool(blocks) == (name in BLOCKS)
    if name in ("lenet", "alexnet", "resnet18"):
        for layer in model.regdrop_dropconnect_layers:
            assert isinstance(model.get_submodule(layer), nn.Linear)


def test_resnet_has_a_site_right_before_the_classifier():
    model = MODELS["resnet18"](DataInfo("x", 10, 3, 32, 10, 10), width=0.125)
    assert isinstance(model.fc[0], DropSite) and model.fc[0].kind == "fc"
    assert isinstance(model.fc[1], nn.Linear)
    assert isinstance(model.maxpool, nn.Identity)  # small-image stem
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)


def test_width_scales_the_channels():
    info = DataInfo("x", 10, 3, 32, 10, 10)
    narrow = MODELS["resnet18"](info, width=0.25)
    wide = MODELS["resnet18"](info, width=0.5)
    assert narrow.conv1.out_channels == 16 and wide.conv1.out_channels == 32
    with pytest.raises(ValueError):
        MODELS["lenet"](info, width=0)


def test_sites_are_identities_until_a_method_fills_them():
    model = MODELS["lenet"](DataInfo("x", 10, 1, 28, 10, 10), width=0.125).train()
    x = torch.randn(4, 1, 28, 28)
    torch.manual_seed(0)
    first = model(x)
    torch.manual_seed(1)
    assert torch.equal(first, model(x))  # no randomness anywhere


def test_vit_uses_the_explicit_attention_path_so_its_attn_site_runs():
    model = MODELS["vit_tiny"](DataInfo("x", 10, 3, 32, 10, 10), **SMALL["vit_tiny"])
    calls = []
    site = model.blocks[0].attn.attn_drop
    site.register_forward_hook(lambda *a: calls.append(1))
    model(torch.randn(1, 3, 32, 32))
    assert calls == [1]


@pytest.mark.parametrize("size, large, patch", [(32, 16, 4), (28, 16, 4), (32, 32, 8), (28, 32, 7), (224, 16, 16)])
def test_patch_size_for_small_images(size, large, patch):
    assert patch_size_for(size, large) == patch


def test_mixer_token_mixing_sites_declare_channels_first():
    # timm runs the token-mixing MLP on B x C x T: its sites' features are on axis 1.
    model = MODELS["mixer"](DataInfo("x", 10, 3, 32, 10, 10), **SMALL["mixer"])
    block = model.blocks[0]
    assert block.mlp_tokens.drop1.feature_axis == 1 and block.mlp_tokens.drop2.feature_axis == 1
    assert block.mlp_channels.drop1.feature_axis == -1


def test_small_alexnet_follows_the_gyro_paper_layout():
    # conv-pool-conv-pool-conv, then FC-FC-FC: two pools, so 32 px -> 8 x 8 maps.
    model = MODELS["alexnet"](DataInfo("x", 10, 3, 32, 10, 10), width=0.125)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.features) == 2
    assert model.classifier[0].in_features == 48 * 8 * 8
