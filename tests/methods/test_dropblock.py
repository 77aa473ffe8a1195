"""DropBlock against its definition (Ghiasi et al. 2018, Algorithm 1): whole blocks whose seeds
lie where a block fits, the seed rate gamma, the kept fraction, the rescale, eval, the
warm-up's zero rate, where it is installed, and exact resume from the global generator."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from regdrop.errors import ConfigError
from regdrop.methods import apply_method, begin_step, check_method
from regdrop.methods.base import DropSite
from regdrop.methods.dropblock import (
    DropBlock2d,
    apply_dropblock,
    block_seeds,
    blocks_from_seeds,
    drop_block,
    seed_rate,
)
from regdrop.schedules import DropSchedule
from tests.methods.test_contract import method_config, tiny


def whole_blocks(dropped: torch.Tensor, block: int) -> torch.Tensor:
    """The union of every ``block x block`` square inside the map that ``dropped`` covers
    entirely (a morphological opening): equal to ``dropped`` exactly when ``dropped`` is a
    union of whole squares inside the map."""
    inside = 1.0 - F.max_pool2d(1.0 - dropped, block, stride=1)  # no padding: squares inside
    return blocks_from_seeds(inside, block, block)


@pytest.mark.parametrize("block", [4, 5])
def test_every_dropped_region_is_a_union_of_whole_blocks_inside_the_map(block):
    torch.manual_seed(0)
    out = drop_block(torch.ones(8, 16, 13, 11), 0.3, block)
    dropped = (out == 0).float()
    assert 0 < dropped.mean() < 1
    assert torch.equal(whole_blocks(dropped, block), dropped)
    # One mask per channel (Algorithm 1); shared by the channels when asked.
    assert not torch.equal(dropped[:, 0], dropped[:, 1])
    shared = (drop_block(torch.ones(8, 16, 13, 11), 0.3, block, share_channels=True) == 0)
    assert torch.equal(shared, shared[:, :1].expand_as(shared)) and shared.any()


def test_seeds_lie_only_where_a_whole_block_fits_and_grow_into_the_block():
    height, width, block = 13, 11, 5
    x = torch.ones(4, 3, height, width)
    seeds = block_seeds(x, 0.5, block)
    assert seeds.shape == (4, 3, height - block + 1, width - block + 1)
    # The last seed position's block ends exactly at the map's bottom-right corner.
    corner = torch.zeros(1, 1, height - block + 1, width - block + 1)
    corner[..., -1, -1] = 1
    grown = blocks_from_seeds(corner, block, block)[0, 0]
    expected = torch.zeros(height, width)
    expected[-block:, -block:] = 1
    assert torch.equal(grown, expected)
    # drop_block zeroes exactly the blocks of the seeds it draws.
    torch.manual_seed(5)
    seeds = block_seeds(x, 0.2, block)
    torch.manual_seed(5)
    out = drop_block(x, 0.2, block)
    assert torch.equal(out == 0, blocks_from_seeds(seeds, block, block).bool())


def test_the_seed_rate_is_the_papers_gamma_and_the_seeds_are_drawn_at_it():
    size, block, rate = 28, 7, 0.1
    gamma = rate / block**2 * size**2 / (size - block + 1) ** 2  # the paper's formula
    assert seed_rate(rate, size, size, block).item() == pytest.approx(gamma, rel=1e-6)
    torch.manual_seed(1)
    seeds = block_seeds(torch.ones(64, 32, size, size), rate, block)
    test = stats.binomtest(int(seeds.sum()), seeds.numel(), gamma)
    assert test.pvalue > 1e-3, (seeds.float().mean().item(), gamma)
    # A map smaller than the block: the block is cut to it and whole maps drop at rate p.
    assert seed_rate(rate, 4, 4, block).item() == pytest.approx(rate)


def keep_probability(height: int, width: int, block: int, rate: float) -> torch.Tensor:
    """The exact probability that each unit of an ``height x width`` map is kept: a unit that
    ``n`` seed positions' blocks cover is kept with ``(1 - gamma)^n``."""
    gamma = seed_rate(rate, height, width, block).double()
    region = torch.ones(1, 1, height - block + 1, width - block + 1, dtype=torch.float64)
    covering = F.conv2d(F.pad(region, (block - 1,) * 4), torch.ones(1, 1, block, block, dtype=torch.float64))
    return ((1 - gamma) ** covering)[0, 0]


def test_the_kept_fraction_of_a_large_map_matches_keep_prob():
    size, block, rate, maps = 56, 7, 0.1, 1024
    torch.manual_seed(2)
    out = drop_block(torch.ones(maps, 1, size, size), rate, block)
    kept = (out != 0).float().mean(dim=(1, 2, 3)).double().numpy()  # one fraction per map
    # Blocks make the units of a map dependent: the maps are the independent draws.
    low, high = stats.t.interval(0.999, maps - 1, loc=kept.mean(), scale=stats.sem(kept))
    expected = keep_probability(size, size, block, rate).mean().item()
    assert low < expected < high
    # The paper's gamma ignores overlapping blocks: the kept fraction is keep_prob to within
    # that second-order term (half a percent here), plus the draws' own spread.
    overlap = abs(expected - (1 - rate))
    assert overlap < 0.01
    assert abs(kept.mean() - (1 - rate)) < overlap + (high - low) / 2


def test_the_rescale_keeps_the_expected_activation_of_the_map():
    torch.manual_seed(3)
    size, block, rate, draws = 12, 3, 0.3, 2000
    x = torch.rand(1, 4, size, size) + 0.5
    out = drop_block(x.expand(draws, -1, -1, -1), rate, block)
    ratio = (out / x).double()
    # count / count_ones over the batch: the map's mean activation is the input's, exactly.
    assert abs(ratio.mean().item() - 1) < 1e-5
    # Per unit, Algorithm 1 keeps a border unit (fewer seeds cover it) more often than an
    # inner one: E[out] = x * P(kept) / mean P(kept), the input only on the map's average.
    keep = keep_probability(size, size, block, rate)
    expected = keep / keep.mean()
    mean, sem = ratio.mean(0), ratio.std(0) / math.sqrt(draws)
    assert ((mean - expected).abs() < 5 * sem).all()
    assert expected[0, 0] > 1.1 and expected[size // 2, size // 2] < 0.95
    ones = torch.ones(16, 4, size, size)
    per_sample = drop_block(ones, rate, block, scale_per="sample")
    assert torch.allclose(per_sample.sum(dim=(1, 2, 3)), ones[0].sum().expand(16))
    # Everything dropped: zeros, not NaN.
    assert torch.equal(drop_block(torch.ones(1, 1, 4, 4), 0.999999, 4), torch.zeros(1, 1, 4, 4))


def test_eval_is_the_identity_and_the_warmups_start_drops_nothing():
    x = torch.randn(4, 8, 9, 9)
    layer = DropBlock2d(0.3, block_size=3)
    assert layer.eval()(x) is x
    assert drop_block(x, 0.3, 3, training=False) is x
    model = nn.Sequential(layer).train()
    warmup = DropSchedule("warmup", steps=10)
    begin_step(model, 0, warmup.factor(0))  # the linear ramp from keep_prob 1
    assert layer.rate_value() == 0.0 and torch.equal(layer(x), x)
    assert torch.equal(drop_block(x, torch.tensor(0.0), 3), x)  # the tensor path, as compiled
    begin_step(model, 5, warmup.factor(5))  # halfway up: gamma follows the rate in force
    torch.manual_seed(4)
    seeds = block_seeds(torch.ones(64, 32, 9, 9), layer.rate, 3)
    gamma = seed_rate(0.3 * 5 / 9, 9, 9, 3).item()
    assert stats.binomtest(int(seeds.sum()), seeds.numel(), gamma).pvalue > 1e-3


def test_on_a_resnet_it_follows_each_batch_norm_and_the_projection_shortcut_of_stages_3_and_4():
    model = tiny("resnet50")
    report = apply_method(model, method_config("dropblock"), seed=0)
    names = [name for name, m in model.named_modules() if isinstance(m, DropBlock2d)]
    blocks = [n for n, m in model.named_modules() if type(m).__name__ == "Bottleneck"]
    in_stages = [n for n in blocks if n.startswith(("layer3.", "layer4."))]
    expected = {f"{b}.bn{k}.1" for b in in_stages for k in (1, 2, 3)}
    expected |= {f"{b}.downsample.2" for b in in_stages if model.get_submodule(b).downsample is not None}
    assert set(names) == expected and len(report) == len(expected) == 6 * 3 + 3 * 3 + 2
    assert all(isinstance(model.get_submodule(n.rsplit(".", 1)[0])[0], nn.BatchNorm2d | nn.Conv2d)
               for n in names)
    # The paper's code: group 4 at p, group 3 at p / 4 (stage_decay 4); stage_decay 1: p everywhere.
    p = method_config("dropblock")["p"]
    assert all(model.get_submodule(n).peak == pytest.approx(p if n.startswith("layer4") else p / 4)
               for n in names)
    flat = tiny("resnet50")
    apply_dropblock(flat, p=0.2, stage_decay=1.0)
    assert all(m.peak == pytest.approx(0.2) for m in flat.modules() if isinstance(m, DropBlock2d))
    cifar = tiny("resnet56")
    report = apply_dropblock(cifar, p=0.2, stages=[2, 3], block_size=3)
    assert len(report) == 2 * (9 * 2 + 1)  # nine BasicBlocks and an option-A shortcut per stage
    peaks = [m.peak for m in cifar.layer3.modules() if isinstance(m, DropBlock2d)]
    assert peaks == [pytest.approx(0.2)] * 19  # its last stage is layer3
    with pytest.raises(ConfigError, match="stages") as err:
        apply_method(tiny("resnet18"), method_config("dropblock", stages=[5]), seed=0)
    assert err.value.key == "dropout=dropblock"


def test_without_residual_blocks_it_fills_the_conv_sites():
    model = tiny("lenet")
    report = apply_dropblock(model, p=0.2, block_size=3)
    sites = [m for m in model.modules() if isinstance(m, DropBlock2d)]
    assert len(report) == len(sites) == 2 and not any(isinstance(m, DropSite) and m.kind == "conv"
                                                      for m in model.modules())
    with pytest.raises(ValueError, match="no drop site"):
        apply_dropblock(nn.Sequential(nn.Linear(3, 3)))


@pytest.mark.parametrize("key, value", [("block_size", 0), ("stages", []), ("scale_per", "map"),
                                        ("p", 1.0), ("share_channels", "perhaps"),
                                        ("stage_decay", 0.5)])
def test_a_bad_option_is_named_without_a_model(key, value):
    with pytest.raises(ConfigError) as err:
        check_method(method_config("dropblock", **{key: value}))
    assert err.value.key == f"dropout.{key}"


def build(seed: int) -> nn.Module:
    torch.manual_seed(seed)  # different initial weights: load_state_dict must bring them
    model = tiny("resnet18")
    apply_method(model, method_config("dropblock", block_size=3), seed=0)
    return model.train()


def test_a_restored_model_and_global_generator_make_the_same_draws_and_the_seed_changes_them():
    x = torch.randn(4, 3, 16, 16)
    model = build(0)
    torch.manual_seed(7)
    model(x)  # a step already taken
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    first = model(x)
    restored = build(1)
    restored.load_state_dict(weights)
    torch.set_rng_state(rng)
    assert torch.equal(restored(x), first)
    restored.load_state_dict(weights)
    torch.manual_seed(8)  # another run seed: other masks
    assert not torch.equal(restored(x), first)
