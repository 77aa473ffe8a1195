"""Stochastic depth: block mode skips dropped branches, sample mode matches torchvision."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torchvision
from timm.layers import calculate_drop_path_rates
from timm.models.convnext import ConvNeXt, convnext_femto
from timm.models.mlp_mixer import MlpMixer
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torchvision.models.resnet import BasicBlock

from regdrop.data import DataInfo
from regdrop.methods.base import DropModule, MethodNotApplicable, set_rate_factor
from regdrop.methods.stochastic_depth import (
    BranchGate,
    StochasticDepthBasicBlock,
    StochasticDepthConvNeXtBlock,
    StochasticDepthSwinBlock,
    apply_stochastic_depth,
    depth_rates,
    drop_path_per_sample,
)
from regdrop.models import MODELS


def tiny_vit(depth: int = 2) -> VisionTransformer:
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=depth,
                             num_heads=2, num_classes=10)


def tiny_mixer() -> MlpMixer:
    return MlpMixer(img_size=16, patch_size=4, embed_dim=32, num_blocks=2, num_classes=10)


def tiny_swin() -> SwinTransformer:
    # 8 x 8 grid with 4 x 4 windows: the second block of the first stage is shifted.
    return SwinTransformer(img_size=16, patch_size=2, embed_dim=16, depths=(2, 2),
                           num_heads=(2, 4), window_size=4, num_classes=10, drop_path_rate=0.0)


def tiny_convnext(ls_init_value: float = 0.5) -> ConvNeXt:
    # A layer scale of 0.5 (timm's default is 1e-6) so the branch visibly matters.
    return convnext_femto(pretrained=False, num_classes=10, dims=(8, 16, 24, 32),
                          depths=(1, 2, 1, 1), patch_size=1, ls_init_value=ls_init_value)


def gates(model: nn.Module) -> list[BranchGate]:
    return [m for m in model.modules() if isinstance(m, BranchGate)]


def five_sigma(n: int, p: float) -> float:
    return 5 * math.sqrt(n * p * (1 - p))


class CallCounter:
    """Counts forward calls of a module through a hook."""

    def __init__(self, module: nn.Module) -> None:
        self.calls = 0
        module.register_forward_hook(self._hook)

    def _hook(self, *_: object) -> None:
        self.calls += 1


# --------------------------------------------------------------------------- depth profile


def test_linear_rule_is_l_over_L():
    assert depth_rates(0.5, 4) == pytest.approx([0.125, 0.25, 0.375, 0.5])
    assert depth_rates(0.2, 3, "uniform") == [0.2, 0.2, 0.2]


@pytest.mark.parametrize("rate, blocks", [(0.5, 12), (0.1, 24), (0.4, 12), (0.3, 1), (0.0, 5)])
def test_linspace_rule_is_timms_bit_for_bit(rate, blocks):
    # timm's stochastic depth decay rule: linspace(0, p, N), first block 0, last p.
    ours = depth_rates(rate, blocks, "linspace")
    assert ours == calculate_drop_path_rates(rate, blocks)
    assert ours == [x.item() for x in torch.linspace(0, rate, blocks)]
    assert ours[0] == 0.0 and ours[-1] == pytest.approx(rate if blocks > 1 else 0.0)


def _official_rates(timm_model: nn.Module) -> list[float]:
    """The drop-path rate of every ``DropPath`` of a timm model built with a drop path."""
    return [m.drop_prob for m in timm_model.modules() if type(m).__name__ == "DropPath"]


@pytest.mark.parametrize("mode", ["block", "sample"])
def test_swin_femto_gates_get_the_official_linspace_rates(mode):
    # Liu et al.'s code and timm: dpr = linspace(0, p, sum(depths)), one rate per Swin
    # block, shared by its attention and MLP branches (drop_path1, drop_path2).
    info = DataInfo("imagenet", 1000, 3, 224, 10, 10)
    with torch.device("meta"):
        model = MODELS["swin_femto"](info)
        official = SwinTransformer(embed_dim=40, depths=(2, 2, 6, 2), num_heads=(2, 4, 8, 16),
                                   drop_path_rate=0.5)
    report = apply_stochastic_depth(model, p=0.5, mode=mode, distribution="linspace")
    assert report.counts() == {"SwinTransformerBlock -> StochasticDepthSwinBlock": 12}
    expected = [x.item() for x in torch.linspace(0, 0.5, 12)]
    ours = [g.peak for g in gates(model)]
    assert ours == [rate for rate in expected for _branch in range(2)]
    # timm builds no DropPath for the first block (rate 0): its two branches are the zeros.
    assert ours == [0.0, 0.0, *_official_rates(official)]


@pytest.mark.parametrize("mode", ["block", "sample"])
def test_convnext_femto_gates_get_the_official_linspace_rates(mode):
    info = DataInfo("imagenet", 1000, 3, 224, 10, 10)
    with torch.device("meta"):
        model = MODELS["convnext_femto"](info)
        official = convnext_femto(pretrained=False, drop_path_rate=0.5)
    report = apply_stochastic_depth(model, p=0.5, mode=mode, distribution="linspace")
    assert report.counts() == {"ConvNeXtBlock -> StochasticDepthConvNeXtBlock": 12}
    expected = [x.item() for x in torch.linspace(0, 0.5, 12)]
    assert [g.peak for g in gates(model)] == expected == [0.0, *_official_rates(official)]


def test_resnet18_gates_follow_linear_rule_in_module_order():
    model = torchvision.models.resnet18(num_classes=10)
    report = apply_stochastic_depth(model, p=0.5)
    assert report.counts() == {"BasicBlock -> StochasticDepthBasicBlock": 8}
    expected = [0.5 * block / 8 for block in range(1, 9)]
    assert [g.peak for g in gates(model)] == pytest.approx(expected)
    assert [float(g.rate) for g in gates(model)] == pytest.approx(expected)


def test_vit_branches_share_their_block_rate():
    model = tiny_vit(depth=4)
    apply_stochastic_depth(model, p=0.4)
    peaks = [g.peak for g in gates(model)]
    assert peaks == pytest.approx([0.1, 0.1, 0.2, 0.2, 0.3, 0.3, 0.4, 0.4])


def test_uniform_distribution_and_schedule_factor_scales_the_profile():
    model = tiny_mixer()
    apply_stochastic_depth(model, p=0.3, distribution="uniform")
    assert [g.peak for g in gates(model)] == pytest.approx([0.3] * 4)
    model = tiny_vit(depth=2)
    apply_stochastic_depth(model, p=0.4)
    set_rate_factor(model, 0.5)
    assert [float(g.rate) for g in gates(model)] == pytest.approx([0.1, 0.1, 0.2, 0.2])


# --------------------------------------------------------------------------- block mode


def test_block_mode_never_computes_a_dropped_branch_and_drops_binomially():
    torch.manual_seed(0)
    downsample = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))
    model = nn.Sequential(BasicBlock(4, 8, stride=2, downsample=downsample))
    apply_stochastic_depth(model, p=0.5, distribution="uniform", seed=3)
    block = model[0]
    branch_calls = [CallCounter(block.conv1), CallCounter(block.bn1), CallCounter(block.conv2),
                    CallCounter(block.bn2)]
    shortcut_calls = CallCounter(block.downsample)
    x = torch.randn(2, 4, 4, 4)
    n, dropped = 200, 0
    for _ in range(n):
        before = branch_calls[0].calls
        out = block(x)
        if branch_calls[0].calls == before:
            dropped += 1
            # Only the shortcut and the post-activation ran.
            expected = torch.relu(block.downsample(x))
            torch.testing.assert_close(out, expected)
    assert all(c.calls == n - dropped for c in branch_calls)
    # The check above re-runs the shortcut once per dropped batch.
    assert shortcut_calls.calls == n + dropped
    assert abs(dropped - n * 0.5) < five_sigma(n, 0.5)


def test_block_mode_scales_kept_branch_inverted_and_keeps_input_intact():
    torch.manual_seed(0)
    model = nn.Sequential(BasicBlock(4, 4))
    apply_stochastic_depth(model, p=0.25, distribution="uniform", seed=1)
    block = model[0]
    x = torch.relu(torch.randn(2, 4, 5, 5)).requires_grad_()
    x_before = x.detach().clone()
    saw = set()
    for _ in range(40):
        gate_state = block.gate.generator.get_state()
        out = block(x)
        block.gate.generator.set_state(gate_state)
        kept = block.gate.keep()
        branch = block.branch(x)
        expected = torch.relu(branch / 0.75 + x) if kept else torch.relu(x)
        torch.testing.assert_close(out, expected)
        out.sum().backward()  # the in-place ReLU must not clobber a tensor autograd needs
        saw.add(kept)
    assert saw == {True, False}
    torch.testing.assert_close(x.detach(), x_before)


def test_vit_block_mode_gates_attention_and_mlp_independently():
    torch.manual_seed(0)
    model = tiny_vit(depth=1)
    apply_stochastic_depth(model, p=0.5, seed=7)  # one block: rate 0.5
    block = model.blocks[0]
    attn_calls, mlp_calls = CallCounter(block.attn), CallCounter(block.mlp)
    n, both_dropped = 300, 0
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        for _ in range(n):
            a, m = attn_calls.calls, mlp_calls.calls
            model(x)
            both_dropped += attn_calls.calls == a and mlp_calls.calls == m
    assert abs((n - attn_calls.calls) - n / 2) < five_sigma(n, 0.5)
    assert abs((n - mlp_calls.calls) - n / 2) < five_sigma(n, 0.5)
    assert abs(both_dropped - n / 4) < five_sigma(n, 0.25)


def test_mixer_block_mode_gates_token_and_channel_branches():
    model = tiny_mixer()
    apply_stochastic_depth(model, p=0.6, distribution="uniform", seed=5)
    block = model.blocks[0]
    tok, chan = CallCounter(block.mlp_tokens), CallCounter(block.mlp_channels)
    n = 200
    with torch.no_grad():
        for _ in range(n):
            model(torch.randn(2, 3, 16, 16))
    assert abs(tok.calls - n * 0.4) < five_sigma(n, 0.4)
    assert abs(chan.calls - n * 0.4) < five_sigma(n, 0.4)


def test_swin_block_mode_gates_attention_and_mlp_independently():
    model = tiny_swin()
    apply_stochastic_depth(model, p=0.5, distribution="uniform", seed=11)
    block = model.layers[0].blocks[1]
    assert isinstance(block, StochasticDepthSwinBlock) and block.shift_size == (2, 2)
    attn_calls, mlp_calls = CallCounter(block.attn), CallCounter(block.mlp)
    n, both_dropped = 300, 0
    x = torch.randn(2, 8, 8, 16)  # the block alone: B x H x W x C
    with torch.no_grad():
        for _ in range(n):
            a, m = attn_calls.calls, mlp_calls.calls
            block(x)
            both_dropped += attn_calls.calls == a and mlp_calls.calls == m
    assert abs((n - attn_calls.calls) - n / 2) < five_sigma(n, 0.5)
    assert abs((n - mlp_calls.calls) - n / 2) < five_sigma(n, 0.5)
    assert abs(both_dropped - n / 4) < five_sigma(n, 0.25)


def test_swin_branches_are_timms_scaled_when_kept_and_skipped_when_dropped():
    torch.manual_seed(0)
    original = tiny_swin()
    model = copy.deepcopy(original)
    apply_stochastic_depth(model, p=0.3, distribution="uniform", seed=2)
    block, ref = model.layers[0].blocks[1], original.layers[0].blocks[1]  # shifted windows
    x = torch.randn(2, 8, 8, 16)
    seen = set()
    with torch.no_grad():
        for _ in range(30):
            states = [g.generator.get_state() for g in block.gates()]
            out = block(x)
            for gate, state in zip(block.gates(), states, strict=True):
                gate.generator.set_state(state)
            keep_attn, keep_mlp = block.gate_attn.keep(), block.gate_mlp.keep()
            # timm's own window attention and MLP, on the original block.
            y = x + ref._attn(ref.norm1(x)) / 0.7 if keep_attn else x
            y = y.reshape(2, 64, 16)
            y = y + ref.mlp(ref.norm2(y)) / 0.7 if keep_mlp else y
            torch.testing.assert_close(out, y.reshape(2, 8, 8, 16))
            seen.add((keep_attn, keep_mlp))
    assert len(seen) == 4


def test_swin_wrapper_keeps_timms_mask_buffer_and_follows_a_new_input_size():
    torch.manual_seed(0)
    original = tiny_swin()
    model = copy.deepcopy(original)
    apply_stochastic_depth(model, p=0.5, mode="sample")
    added = set(model.state_dict()) - set(original.state_dict())
    assert added and all(".gate_" in key for key in added)  # no mask buffer saved
    block = model.layers[0].blocks[1]
    torch.testing.assert_close(block.attn_mask, original.layers[0].blocks[1].attn_mask)
    set_rate_factor(model, 0.0)
    for net in (original, model):
        net.set_input_size((24, 24))  # timm recomputes windows and masks in every block
    x = torch.randn(2, 3, 24, 24)
    torch.testing.assert_close(model(x), original(x), rtol=0, atol=0)
    assert block.input_resolution == (12, 12)


def test_convnext_block_mode_skips_the_branch_and_scales_the_kept_one():
    torch.manual_seed(0)
    original = tiny_convnext()
    model = copy.deepcopy(original)
    apply_stochastic_depth(model, p=0.4, distribution="uniform", seed=3)
    block, ref = model.stages[1].blocks[0], original.stages[1].blocks[0]
    assert isinstance(block, StochasticDepthConvNeXtBlock)
    assert block.gamma is model.stages[1].blocks[0].gamma and block.gamma is not None
    dw_calls = CallCounter(block.conv_dw)
    x = torch.randn(2, 16, 4, 4)
    seen = set()
    with torch.no_grad():
        for _ in range(40):
            state = block.gate.generator.get_state()
            before = dw_calls.calls
            out = block(x)
            block.gate.generator.set_state(state)
            kept = block.gate.keep()
            assert (dw_calls.calls > before) == kept  # a dropped branch is not computed
            branch = ref(x) - x  # timm's block: layer-scaled branch + identity shortcut
            torch.testing.assert_close(out, x + branch / 0.6 if kept else x)
            seen.add(kept)
    assert seen == {True, False}


def test_convnext_without_layer_scale():
    model = convnext_femto(pretrained=False, num_classes=10, dims=(8, 16, 24, 32),
                           depths=(1, 1, 1, 1), patch_size=1, ls_init_value=None)
    reference = copy.deepcopy(model).eval()
    apply_stochastic_depth(model, p=0.5, mode="sample")
    assert model.stages[0].blocks[0].gamma is None
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model.eval()(x), reference(x), rtol=0, atol=0)


def test_state_dict_round_trip_reproduces_gates():
    base = torchvision.models.resnet18(num_classes=10)
    first, second = copy.deepcopy(base), copy.deepcopy(base)
    apply_stochastic_depth(first, p=0.5, seed=1)
    apply_stochastic_depth(second, p=0.5, seed=99)
    for _ in range(5):
        for gate in gates(first):
            gate.keep()
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    draws_first = [[g.keep() for _ in range(30)] for g in gates(first)]
    draws_second = [[g.keep() for _ in range(30)] for g in gates(second)]
    assert draws_first == draws_second
    assert any(not all(d) for d in draws_first)


def test_cached_rate_follows_schedule_load_and_moves():
    # Block mode decides in Python on the mirrored rate (DropModule.rate_value).
    gate = BranchGate(0.4)
    assert gate.rate_value() == pytest.approx(0.4)
    mirror = gate._rate_mirror
    assert gate.rate_value() == pytest.approx(0.4) and gate._rate_mirror is mirror  # no re-read
    gate.set_rate_factor(0.5)
    assert gate.rate_value() == pytest.approx(0.2)
    gate.load_state_dict({"rate": torch.tensor(0.1), "_extra_state": gate.get_extra_state()})
    assert gate.rate_value() == pytest.approx(0.1)
    gate.rate = gate.rate.clone().fill_(0.3)  # what .to(device) does: a new tensor
    assert gate.rate_value() == pytest.approx(0.3)
    with torch.inference_mode():
        gate.rate = torch.tensor(0.25)  # no version counter: read directly
    assert gate.rate_value() == 0.25


def test_same_seed_same_gates_and_gates_differ_between_blocks():
    models = [tiny_vit(depth=3) for _ in range(2)]
    for model in models:
        apply_stochastic_depth(model, p=0.9, distribution="uniform", seed=4)
    draws = [[[g.keep() for _ in range(40)] for g in gates(m)] for m in models]
    assert draws[0] == draws[1]
    assert len({tuple(d) for d in draws[0]}) == len(draws[0])


# --------------------------------------------------------------------------- sample mode


def test_sample_mode_matches_torchvision_row_statistics():
    rate, batch, trials = 0.3, 1000, 4
    x = torch.ones(batch, 3, 2)
    ours_kept = tv_kept = 0
    ours_mean = tv_mean = 0.0
    torch.manual_seed(0)
    for _ in range(trials):
        ours = drop_path_per_sample(x, torch.tensor(rate))
        tv = torchvision.ops.stochastic_depth(x, rate, mode="row", training=True)
        for out in (ours, tv):
            per_sample = out.flatten(1)
            # Whole samples: all zero or all 1 / (1 - rate).
            assert torch.all((per_sample == 0).all(1) | torch.isclose(
                per_sample, torch.tensor(1 / (1 - rate))).all(1))
        ours_kept += int((ours[:, 0, 0] != 0).sum())
        tv_kept += int((tv[:, 0, 0] != 0).sum())
        ours_mean += float(ours.mean()) / trials
        tv_mean += float(tv.mean()) / trials
    n = batch * trials
    tol = five_sigma(n, 1 - rate)
    assert abs(ours_kept - n * (1 - rate)) < tol
    assert abs(tv_kept - n * (1 - rate)) < tol
    assert abs(ours_kept - tv_kept) < math.sqrt(2) * tol
    # Both are unbiased: mean output 1, std of the mean sqrt(rate / (1 - rate) / n).
    mean_tol = 5 * math.sqrt(rate / (1 - rate) / n)
    assert abs(ours_mean - 1) < mean_tol and abs(tv_mean - 1) < mean_tol


def test_sample_mode_in_a_block_drops_whole_samples_of_the_branch():
    torch.manual_seed(0)
    model = nn.Sequential(BasicBlock(4, 4))
    apply_stochastic_depth(model, p=0.5, mode="sample", distribution="uniform")
    block = model[0]
    x = torch.relu(torch.randn(64, 4, 3, 3))
    out = block(x)
    branch = block.branch(x)  # batch-norm statistics are the same batch's, so the same branch
    dropped = torch.tensor([torch.allclose(o, torch.relu(xi)) for o, xi in zip(out, x, strict=True)])
    kept = torch.tensor([torch.allclose(o, torch.relu(2 * b + xi), atol=1e-5)
                        for o, b, xi in zip(out, branch, x, strict=True)])
    assert torch.all(dropped ^ kept)
    assert abs(int(kept.sum()) - 32) < five_sigma(64, 0.5)


def test_sample_mode_keeps_dtype():
    x = torch.randn(8, 4, dtype=torch.bfloat16)
    assert drop_path_per_sample(x, torch.tensor(0.5)).dtype == torch.bfloat16


# --------------------------------------------------------------------------- whole models


@pytest.mark.parametrize("mode", ["block", "sample"])
@pytest.mark.parametrize("build,shape", [
    (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 16, 16)),
    (lambda: torchvision.models.resnet50(num_classes=10), (2, 3, 16, 16)),
    (tiny_vit, (2, 3, 16, 16)),
    (tiny_mixer, (2, 3, 16, 16)),
    (tiny_swin, (2, 3, 16, 16)),
    (tiny_convnext, (2, 3, 16, 16)),
], ids=["resnet18", "resnet50", "vit", "mixer", "swin", "convnext"])
def test_forward_backward_and_eval_equals_original_blocks(build, shape, mode):
    torch.manual_seed(0)
    original = build()
    model = copy.deepcopy(original)
    report = apply_stochastic_depth(model, p=0.5, mode=mode)
    assert len(report) > 0
    x = torch.randn(shape)
    model.train()
    out = model(x)
    assert out.shape == (shape[0], 10)
    out.square().mean().backward()
    assert any(p.grad is not None for p in model.parameters())
    # Same parameter objects, same state_dict keys plus the gates'.
    assert set(original.state_dict()) <= set(model.state_dict())
    model.eval()
    original.eval()
    # Training updated batch-norm statistics; compare with the original's current weights.
    original.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        first, second = model(x), model(x)
        torch.testing.assert_close(first, second, rtol=0, atol=0)
        torch.testing.assert_close(first, original(x), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["block", "sample"])
def test_rate_zero_is_the_original_block_in_training(mode):
    torch.manual_seed(0)
    original = torchvision.models.resnet18(num_classes=10)
    model = copy.deepcopy(original)
    apply_stochastic_depth(model, p=0.0, mode=mode)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model(x), original(x), rtol=0, atol=0)
    for build in (tiny_vit, tiny_swin, tiny_convnext):
        net = build()
        ref = copy.deepcopy(net)
        apply_stochastic_depth(net, p=0.5, mode=mode, distribution="linspace")
        set_rate_factor(net, 0.0)
        x = torch.randn(2, 3, 16, 16)
        torch.testing.assert_close(net(x), ref(x), rtol=0, atol=0)


def test_test_time_scaling_multiplies_the_branch_at_eval_only():
    torch.manual_seed(0)
    model = nn.Sequential(BasicBlock(4, 4))
    apply_stochastic_depth(model, p=0.4, distribution="uniform", scaling="test_time")
    block = model[0].eval()
    x = torch.relu(torch.randn(2, 4, 5, 5))
    with torch.no_grad():
        torch.testing.assert_close(block(x), torch.relu(0.6 * block.branch(x) + x))
        block.train()
        outs = [block(x) for _ in range(30)]
    branch = block.branch(x)  # train-mode batch norm, as in the forwards above
    unscaled = torch.relu(branch + x)
    assert all(torch.allclose(o, unscaled) or torch.allclose(o, torch.relu(x)) for o in outs)


# --------------------------------------------------------------------------- errors, repr


def test_model_without_residual_blocks_is_not_applicable():
    with pytest.raises(MethodNotApplicable, match="residual blocks") as info:
        apply_stochastic_depth(torchvision.models.alexnet(num_classes=10))
    assert all(block in str(info.value) for block in (
        "BasicBlock", "Bottleneck", "vision_transformer.Block", "MixerBlock",
        "SwinTransformerBlock", "ConvNeXtBlock"))


@pytest.mark.parametrize("kwargs,name", [
    ({"p": 1.0}, "p"), ({"mode": "batch"}, "mode"),
    ({"distribution": "cosine"}, "distribution"), ({"scaling": "none"}, "scaling"),
    ({"seed": 1.5}, "seed"),
])
def test_bad_hyper_parameters_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        apply_stochastic_depth(torchvision.models.resnet18(), **kwargs)


def test_gate_is_a_drop_module_with_full_repr():
    model = nn.Sequential(BasicBlock(4, 4))
    apply_stochastic_depth(model, p=0.2, mode="sample", scaling="test_time", seed=3)
    assert isinstance(model[0], StochasticDepthBasicBlock)
    gate = model[0].gate
    assert isinstance(gate, DropModule)
    text = repr(gate)
    assert all(s in text for s in ("peak=0.2", "mode='sample'", "scaling='test_time'", "seed="))
