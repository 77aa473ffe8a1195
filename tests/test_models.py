"""Every model adapts to its data and declares its drop sites and residual blocks."""

import pytest
import timm
import torch
import torchvision
from timm.models.convnext import ConvNeXtBlock
from timm.models.mlp_mixer import MixerBlock
from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.vision_transformer import Block
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from regdrop.data import DataInfo
from regdrop.methods.base import DropSite, find_sites
from regdrop.models import MODELS
from regdrop.models.cuda_convnet import ResponseNorm2d
from regdrop.models.resnet import ShortcutA
from regdrop.models.vit import patch_size_for

# Tiny options per model: the same layout at a fraction of the width / depth.
SMALL = {
    "lenet": {"width": 0.125},
    "alexnet": {"width": 0.125},
    "resnet18": {"width": 0.125},
    "resnet50": {"width": 0.125},
    "resnet101": {"width": 0.125},
    "resnet56": {"width": 0.25},
    "resnet110": {"width": 0.25},
    "vit_tiny": {"depth": 2, "embed_dim": 48},
    "vit_base": {"depth": 2, "embed_dim": 48, "num_heads": 4},
    "mixer": {"depth": 2, "embed_dim": 64},
    "swin_femto": {"embed_dim": 16, "depths": [2, 1, 1, 1]},
    "convnext_femto": {"width": 0.125, "depths": [1, 1, 1, 1]},
    "mlp": {"hidden": [32, 32]},
    "cuda_convnet": {"width": 0.25},
    "vgg16": {"width": 0.125},
}
BLOCKS = {
    "resnet18": BasicBlock, "resnet50": Bottleneck, "resnet101": Bottleneck,
    "resnet56": BasicBlock, "resnet110": BasicBlock, "vit_tiny": Block, "vit_base": Block,
    "mixer": MixerBlock, "swin_femto": SwinTransformerBlock, "convnext_femto": ConvNeXtBlock,
}
ALL_BLOCK_TYPES = tuple(set(BLOCKS.values()))
SITE_KINDS = {
    "lenet": {"fc", "conv"},
    "alexnet": {"fc", "conv"},
    "resnet18": {"fc", "conv"},
    "resnet50": {"fc", "conv"},
    "resnet101": {"fc", "conv"},
    "resnet56": {"fc", "conv"},
    "resnet110": {"fc", "conv"},
    "vit_tiny": {"fc", "token", "attn"},
    "vit_base": {"fc", "token", "attn"},
    "mixer": {"fc", "token"},
    "swin_femto": {"fc", "token", "attn"},
    "convnext_femto": {"fc", "conv"},
    "mlp": {"fc"},
    "cuda_convnet": {"fc", "conv"},
    "vgg16": {"fc", "conv"},
}
RESNETS = {"resnet18", "resnet50", "resnet101", "resnet56", "resnet110"}
# Deeper copies of a tested class (ResNet-50's, ResNet-56's): their tiny forward is slow only.
DEEPER_COPIES = {"resnet101", "resnet110"}


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_on_meta(name: str, info: DataInfo, **options) -> nn.Module:
    """A full-size model on the meta device: shapes and parameter counts, no memory."""
    with torch.device("meta"):
        return MODELS[name](info, **options)


IMAGENET = DataInfo("imagenet", 1000, 3, 224, 10, 10)


def test_every_model_is_tested():
    assert set(SMALL) == set(MODELS) == set(SITE_KINDS)


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=[pytest.mark.slow] if name in DEEPER_COPIES else []) for name in MODELS
])
@pytest.mark.parametrize("channels, size, classes", [(1, 28, 10), (3, 32, 100)])
def test_model_adapts_to_channels_size_and_classes(name, channels, size, classes):
    model = MODELS[name](DataInfo("x", classes, channels, size, 10, 10), **SMALL[name])
    out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, classes)
    out.sum().backward()  # trainable end to end
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", list(MODELS))
def test_full_size_model_takes_imagenet_sized_input(name):
    # Full width and depth on the meta device: every shape of a 224 px forward checks.
    options = {"variant": "torchvision"} if name == "alexnet" else {}
    model = build_on_meta(name, IMAGENET, **options)
    with torch.device("meta"):
        out = model(torch.empty(2, 3, 224, 224))
    assert out.shape == (2, 1000)


@pytest.mark.parametrize("name", ["vit_base", "mixer", "swin_femto", "convnext_femto"])
def test_imagenet_models_train_at_224_px(name):
    # (The ResNets' 224 px stem and every other model's shapes: the meta test above.)
    options = {**SMALL[name], "size": "b16"} if name == "mixer" else SMALL[name]
    model = MODELS[name](DataInfo("x", 5, 3, 224, 10, 10), **options)
    out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 5)
    out.sum().backward()


# Parameter counts at 224 px and 1000 classes, against timm's / torchvision's own
# definitions of the same networks (built offline, on the meta device).
@pytest.mark.parametrize("name, options, reference, expected", [
    ("vit_tiny", {}, lambda: timm.create_model("vit_tiny_patch16_224"), 5.72e6),
    ("vit_base", {}, lambda: timm.create_model("vit_base_patch16_224"), 86.57e6),
    ("mixer", {"size": "s32"}, lambda: timm.create_model("mixer_s32_224"), 19.10e6),
    ("mixer", {"size": "b16"}, lambda: timm.create_model("mixer_b16_224"), 59.88e6),
    ("convnext_femto", {}, lambda: timm.create_model("convnext_femto"), 5.22e6),
    ("resnet50", {}, torchvision.models.resnet50, 25.56e6),
    ("resnet101", {}, torchvision.models.resnet101, 44.55e6),
], ids=["vit_tiny", "vit_base", "mixer_s32", "mixer_b16", "convnext_femto", "resnet50", "resnet101"])
def test_parameter_counts_match_timm_and_torchvision(name, options, reference, expected):
    ours = build_on_meta(name, IMAGENET, **options)
    with torch.device("meta"):
        theirs = reference()
    assert parameters(ours) == parameters(theirs)
    assert parameters(ours) == pytest.approx(expected, rel=0.005)


@pytest.mark.parametrize("name, paper", [("resnet56", 0.85e6), ("resnet110", 1.7e6)])
def test_cifar_resnets_match_he_et_al_parameter_counts(name, paper):
    # He et al. (2016), Table 6: ResNet-56 0.85M, ResNet-110 1.7M parameters (CIFAR-10).
    model = MODELS[name](DataInfo("cifar10", 10, 3, 32, 10, 10))
    assert parameters(model) == pytest.approx(paper, rel=0.02)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == {"resnet56": 27, "resnet110": 54}[name]
    assert [model.get_submodule(f"layer{i}")[0].conv1.out_channels for i in (1, 2, 3)] == [16, 32, 64]
    # 6n + 2 weighted layers: every conv and the classifier.
    weighted = sum(isinstance(m, nn.Conv2d | nn.Linear) for m in model.modules())
    assert weighted == {"resnet56": 56, "resnet110": 110}[name]


def test_swin_femto_has_the_early_dropout_papers_layout():
    model = build_on_meta("swin_femto", IMAGENET)
    stages = list(model.layers)
    assert [len(stage.blocks) for stage in stages] == [2, 2, 6, 2]
    assert [stage.blocks[0].attn.num_heads for stage in stages] == [2, 4, 8, 16]
    assert [stage.blocks[0].dim for stage in stages] == [40, 80, 160, 320]
    assert model.patch_embed.patch_size == (4, 4)
    assert stages[0].blocks[0].window_size == (7, 7)


def test_swin_small_images_use_2px_patches_and_4px_windows_with_shifts():
    model = MODELS["swin_femto"](DataInfo("x", 10, 3, 32, 10, 10), **SMALL["swin_femto"])
    assert model.patch_embed.patch_size == (2, 2)
    first = model.layers[0].blocks
    assert first[0].input_resolution == (16, 16) and first[0].window_size == (4, 4)
    assert first[0].shift_size == (0, 0) and first[1].shift_size == (2, 2)


def test_swin_uses_the_explicit_attention_path_so_its_attn_site_runs():
    model = MODELS["swin_femto"](DataInfo("x", 10, 3, 32, 10, 10), **SMALL["swin_femto"])
    calls = []
    model.layers[0].blocks[1].attn.attn_drop.register_forward_hook(lambda *a: calls.append(1))
    model.train()(torch.randn(1, 3, 32, 32))
    assert calls == [1]


def test_convnext_stem_keeps_a_grid_at_every_stage_of_small_images():
    model = MODELS["convnext_femto"](DataInfo("x", 10, 1, 28, 10, 10), **SMALL["convnext_femto"])
    x = model.stem(torch.randn(1, 1, 28, 28))
    sides = []
    for stage in model.stages:
        x = stage(x)
        sides.append(x.shape[-1])
    assert sides == [28, 14, 7, 3]
    assert build_on_meta("convnext_femto", IMAGENET).stem[0].stride == (4, 4)


@pytest.mark.parametrize("name", list(MODELS))
def test_model_declares_its_sites_and_blocks(name):
    model = MODELS[name](DataInfo("x", 10, 3, 32, 10, 10), **SMALL[name])
    kinds = {m.kind for _, m in find_sites(model)}
    assert kinds == SITE_KINDS[name]
    assert not any(type(m) is nn.Dropout for m in model.modules())  # all dropouts are sites
    blocks = [m for m in model.modules() if type(m) in ALL_BLOCK_TYPES]
    assert bool(blocks) == (name in BLOCKS)
    assert all(type(m) is BLOCKS[name] for m in blocks)
    for layer in getattr(model, "regdrop_dropconnect_layers", []):
        assert isinstance(model.get_submodule(layer), nn.Linear)


@pytest.mark.parametrize("name", list(MODELS))
def test_only_the_resnets_recommend_gyro_settings(name):
    model = MODELS[name](DataInfo("x", 10, 3, 32, 10, 10), **SMALL[name])
    defaults = getattr(model, "regdrop_method_defaults", {})
    # Lee et al. (MLSys 2022): (sigma, tau) = (1024, 8) for ResNet-18 (and BERT).
    assert defaults.get("gyro") == ({"sigma": 1024, "tau": 8} if name in RESNETS else None)


def test_timm_head_and_mlp_dropouts_get_their_kinds():
    swin = MODELS["swin_femto"](DataInfo("x", 10, 3, 32, 10, 10), **SMALL["swin_femto"])
    assert swin.head.drop.kind == "fc"
    assert swin.layers[0].blocks[0].mlp.drop1.kind == "token"
    convnext = MODELS["convnext_femto"](DataInfo("x", 10, 3, 32, 10, 10), **SMALL["convnext_femto"])
    assert convnext.head.drop.kind == "fc"
    site = convnext.stages[0].blocks[0].mlp.drop1
    assert site.kind == "conv" and site.feature_axis == 1  # 1x1-conv MLP: B x C x H x W


def test_resnet_has_a_site_right_before_the_classifier():
    model = MODELS["resnet18"](DataInfo("x", 10, 3, 32, 10, 10), width=0.125)
    assert isinstance(model.fc[0], DropSite) and model.fc[0].kind == "fc"
    assert isinstance(model.fc[1], nn.Linear)
    assert isinstance(model.maxpool, nn.Identity)  # small-image stem
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)


def test_option_a_shortcut_subsamples_and_zero_pads():
    model = MODELS["resnet56"](DataInfo("x", 10, 3, 32, 10, 10))
    shortcut = model.layer2[0].downsample
    assert isinstance(shortcut, ShortcutA) and not list(shortcut.parameters())
    x = torch.randn(2, 16, 32, 32)
    out = shortcut(x)
    assert out.shape == (2, 32, 16, 16)
    torch.testing.assert_close(out[:, :16], x[:, :, ::2, ::2])
    assert torch.all(out[:, 16:] == 0)
    # Odd sizes: the same side as the block's stride-2 conv (ceil(7 / 2) = 4).
    assert shortcut(torch.randn(1, 16, 7, 7)).shape[-1] == model.layer2[0].conv1(torch.randn(1, 16, 7, 7)).shape[-1]
    option_b = MODELS["resnet56"](DataInfo("x", 10, 3, 32, 10, 10), shortcut="B")
    assert isinstance(option_b.layer2[0].downsample[0], nn.Conv2d)
    with pytest.raises(ValueError, match="shortcut"):
        MODELS["resnet56"](DataInfo("x", 10, 3, 32, 10, 10), shortcut="C")


def test_mlp_is_the_dropconnect_papers_mnist_network():
    model = MODELS["mlp"](DataInfo("mnist", 10, 1, 28, 10, 10))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 800), (800, 800), (800, 10)]
    assert [model.get_submodule(n) for n in model.regdrop_dropconnect_layers] == linears[:2]
    tanh = MODELS["mlp"](DataInfo("mnist", 10, 1, 28, 10, 10), hidden=[400, 400], activation="tanh")
    assert sum(isinstance(m, nn.Tanh) for m in tanh.modules()) == 2
    with pytest.raises(ValueError, match="activation"):
        MODELS["mlp"](DataInfo("mnist", 10, 1, 28, 10, 10), activation="elu")
    with pytest.raises(ValueError, match="hidden"):
        MODELS["mlp"](DataInfo("mnist", 10, 1, 28, 10, 10), hidden=[])


def test_cuda_convnet_follows_layers_80sec_with_a_64_unit_fc_layer():
    model = MODELS["cuda_convnet"](DataInfo("cifar10", 10, 3, 32, 10, 10))
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(32, (5, 5)), (32, (5, 5)), (64, (5, 5))]
    assert [type(m) for m in model.features if isinstance(m, nn.MaxPool2d | nn.AvgPool2d)] == [
        nn.MaxPool2d, nn.AvgPool2d, nn.AvgPool2d]
    # 32 -> 16 -> 8 -> 4 px, so 64 * 4 * 4 features into the 64-unit layer.
    assert (model.classifier[0].in_features, model.classifier[0].out_features) == (1024, 64)
    assert model.regdrop_dropconnect_layers == ["classifier.0"]
    with pytest.raises(ValueError, match="12 px"):
        MODELS["cuda_convnet"](DataInfo("x", 10, 3, 11, 10, 10))


def test_response_norm_divides_by_the_local_sum_of_squares_within_each_map():
    norm = ResponseNorm2d(size=3, scale=0.5, power=0.75)
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64)
    expected = torch.empty_like(x)
    for c in range(2):
        for i in range(4):
            for j in range(5):
                window = x[0, c, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2]
                expected[0, c, i, j] = x[0, c, i, j] / (1 + 0.5 / 9 * window.square().sum()) ** 0.75
    torch.testing.assert_close(norm(x), expected)


def test_vgg16_has_the_13_conv_layout_and_a_dropout_fc_head():
    model = MODELS["vgg16"](DataInfo("cifar10", 10, 3, 32, 10, 10))
    convs = [m.out_channels for m in model.features if isinstance(m, nn.Conv2d)]
    assert convs == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.features) == 13
    head = list(model.classifier)
    assert isinstance(head[-2], DropSite) and isinstance(head[-1], nn.Linear)  # multi-sample's copy
    assert model.regdrop_dropconnect_layers == ["classifier.1"]


def test_width_scales_the_channels():
    info = DataInfo("x", 10, 3, 32, 10, 10)
    narrow = MODELS["resnet18"](info, width=0.25)
    wide = MODELS["resnet18"](info, width=0.5)
    assert narrow.conv1.out_channels == 16 and wide.conv1.out_channels == 32
    assert MODELS["resnet110"](info, width=2.0).conv1.out_channels == 32
    assert MODELS["convnext_femto"](info, width=0.5).stem[0].out_channels == 24
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


@pytest.mark.parametrize("size, expected", [("s16", (512, 8, 16)), ("s32", (512, 8, 32)),
                                            ("b16", (768, 12, 16)), ("b32", (768, 12, 32))])
def test_mixer_sizes(size, expected):
    model = build_on_meta("mixer", IMAGENET, size=size)
    assert (model.embed_dim, len(model.blocks), model.stem.patch_size[0]) == expected
    # Small images: patches a quarter of the size's.
    small = build_on_meta("mixer", DataInfo("x", 10, 3, 32, 10, 10), size=size)
    assert small.stem.patch_size[0] == expected[2] // 4
    with pytest.raises(ValueError, match="size"):
        MODELS["mixer"](IMAGENET, size="l16")


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


def test_bad_model_options_name_themselves():
    info = DataInfo("x", 10, 3, 32, 10, 10)
    with pytest.raises(ValueError, match="num_heads"):
        MODELS["swin_femto"](info, embed_dim=16, num_heads=[3, 4, 8, 16])
    with pytest.raises(ValueError, match="depths"):
        MODELS["convnext_femto"](info, depths=[1, 1, 1])
    with pytest.raises(ValueError, match="patch_size"):
        MODELS["swin_femto"](info, patch_size=3)
