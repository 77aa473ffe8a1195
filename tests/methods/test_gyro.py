"""Gyro dropout: bank, periods, selection, sub-batches, shapes, scaling and exact resume."""

from __future__ import annotations

import io
import math
from collections import Counter

import pytest
import torch
from torch import nn

from regdrop.methods.base import DropSite, MethodNotApplicable, SurgeryReport
from regdrop.methods.gyro import (
    GyroDropout,
    apply_gyro_dropout,
    gyro_dropout,
    gyro_masks,
    gyro_period,
)


def make(p=0.5, sigma=16, tau=4, mask_axis=-1, total_steps=100, **kwargs) -> GyroDropout:
    layer = GyroDropout(p, sigma, tau, mask_axis, total_steps=total_steps, **kwargs)
    return layer.train()


def selections(layer: GyroDropout, steps: range) -> list[list[int]]:
    out = []
    for step in steps:
        layer.begin_step(step)
        out.append(layer.selection.tolist())
    return out


def per_period(layer: GyroDropout, periods: int) -> list[list[int]]:
    """The selection of each of the first ``periods`` periods."""
    return [
        sel
        for i, sel in enumerate(selections(layer, range(periods * layer.period)))
        if i % layer.period == 0
    ]


# -- periods ------------------------------------------------------------------------------


def test_period_follows_the_authors_rule_and_never_divides_by_zero() -> None:
    assert gyro_period(19_500, 256, 16) == 1218  # the paper's CIFAR-10 example
    assert gyro_period(3, 256, 16) == 1  # total_steps < sigma // tau
    assert gyro_period(10, 4, 4) == 10  # sigma // tau == 1
    assert make(sigma=256, tau=16, total_steps=5).period == 1
    layer = GyroDropout(0.5, 16, 4)
    layer.setup_run(100)
    assert layer.period == 25


@pytest.mark.parametrize("with_replacement", [False, True])
def test_reselects_exactly_at_period_boundaries(with_replacement: bool) -> None:
    layer = make(sigma=16, tau=4, total_steps=100, with_replacement=with_replacement)
    assert layer.period == 25
    sels = selections(layer, range(100))
    changes = [s for s in range(1, 100) if sels[s] != sels[s - 1]]
    assert changes == [25, 50, 75]


def test_forwards_within_one_step_share_masks() -> None:
    # Gradient accumulation: several forwards per optimizer step must not advance the period.
    layer = make(sigma=16, tau=4, total_steps=16, width=32)
    assert layer.period == 4
    x = torch.ones(8, 32)
    layer.begin_step(3)
    first = layer(x)
    for _ in range(10):
        assert torch.equal(layer(x), first)
    layer.begin_step(4)
    assert not torch.equal(layer(x), first)


def test_selection_is_a_function_of_the_step_however_begin_step_is_called() -> None:
    walked = make(sigma=12, tau=5, total_steps=40)
    walked_sels = selections(walked, range(40))
    jumper = make(sigma=12, tau=5, total_steps=40)
    for step in (37, 3, 22, 0, 39):  # forward and backward jumps
        jumper.begin_step(step)
        assert jumper.selection.tolist() == walked_sels[step]


# -- selection ---------------------------------------------------------------------------


@pytest.mark.parametrize("with_replacement", [False, True])
@pytest.mark.parametrize(("sigma", "tau"), [(16, 4), (10, 4), (7, 7), (5, 1)])
def test_exactly_tau_distinct_masks_every_period(with_replacement, sigma, tau) -> None:
    layer = make(sigma=sigma, tau=tau, total_steps=1, with_replacement=with_replacement)
    assert layer.period == 1  # a new selection every step
    for sel in selections(layer, range(50)):
        assert len(set(sel)) == tau
        assert all(0 <= i < sigma for i in sel)


def test_forward_uses_exactly_tau_distinct_masks() -> None:
    tau, width = 8, 64
    layer = make(sigma=64, tau=tau, width=width)
    layer.begin_step(0)
    out = layer(torch.ones(32, width))
    rows = {tuple(r.tolist()) for r in out}
    assert rows == {tuple(r.tolist()) for r in layer.masks()}
    assert len(rows) == tau


def test_without_replacement_every_mask_is_trained_once_per_pass() -> None:
    sigma, tau = 32, 4
    layer = make(sigma=sigma, tau=tau, total_steps=80)
    passes = 3
    sels = per_period(layer, passes * sigma // tau)
    for k in range(passes):
        used = [i for sel in sels[k * sigma // tau : (k + 1) * sigma // tau] for i in sel]
        assert sorted(used) == list(range(sigma))


def test_without_replacement_leftover_is_topped_up_and_still_covers_the_bank() -> None:
    # sigma % tau != 0: 5 periods of 4 use two permutations of 10 masks: each mask twice.
    layer = make(sigma=10, tau=4, total_steps=100)
    sels = per_period(layer, 10)
    for sel in sels:
        assert len(set(sel)) == 4
    for k in range(2):
        counts = Counter(i for sel in sels[5 * k : 5 * k + 5] for i in sel)
        assert counts == dict.fromkeys(range(10), 2)


def test_with_replacement_leaves_masks_untrained() -> None:
    # The authors' behaviour: over sigma // tau periods about (1 - tau/sigma)^(sigma/tau),
    # ~36% of the bank, is never selected. Fixed seed; a wide band around that value.
    sigma, tau = 256, 16
    replaced = make(sigma=sigma, tau=tau, total_steps=1600, with_replacement=True)
    used = {i for sel in per_period(replaced, sigma // tau) for i in sel}
    unused = sigma - len(used)
    expected = sigma * (1 - tau / sigma) ** (sigma // tau)
    assert abs(unused - expected) < 5 * math.sqrt(expected)
    walked = make(sigma=sigma, tau=tau, total_steps=1600)
    assert len({i for sel in per_period(walked, sigma // tau) for i in sel}) == sigma


# -- forward: sub-batches and shapes -------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3, 4, 7, 10, 16, 33])
def test_sample_i_uses_mask_floor_i_tau_over_b(batch: int) -> None:
    tau, width = 4, 48
    layer = make(sigma=16, tau=tau, width=width)
    layer.begin_step(0)
    x = torch.randn(batch, width)
    out = layer(x)
    masks = layer.masks()
    for i in range(batch):
        assert torch.equal(out[i], x[i] * masks[i * tau // batch])


def test_sub_batches_are_contiguous_and_as_even_as_possible() -> None:
    which = [i * 4 // 10 for i in range(10)]
    assert which == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    x = torch.ones(10, 6)
    masks = torch.arange(4.0)[:, None].expand(4, 6)
    assert gyro_dropout(x, masks)[:, 0].tolist() == which


def test_token_input_masks_channels_shared_over_tokens() -> None:
    batch, tokens, width, tau = 6, 5, 32, 3
    layer = make(sigma=12, tau=tau)
    layer.begin_step(0)
    x = torch.randn(batch, tokens, width)
    out = layer(x)
    assert layer.width == width
    masks = layer.masks()
    for i in range(batch):
        assert torch.equal(out[i], x[i] * masks[i * tau // batch][None, :])


def test_conv_input_masks_whole_channels() -> None:
    batch, channels, tau = 5, 16, 2
    layer = make(sigma=8, tau=tau, mask_axis=1)
    layer.begin_step(0)
    x = torch.randn(batch, channels, 3, 4)
    out = layer(x)
    assert layer.width == channels
    masks = layer.masks()
    for i in range(batch):
        assert torch.equal(out[i], x[i] * masks[i * tau // batch][:, None, None])
        dropped = masks[i * tau // batch] == 0
        assert torch.all(out[i][dropped] == 0)


def test_width_mismatch_and_unbatched_input_are_errors() -> None:
    layer = make(width=8)
    layer.begin_step(0)
    with pytest.raises(ValueError, match="8 features"):
        layer(torch.ones(4, 9))
    with pytest.raises(ValueError, match="batched"):
        layer(torch.ones(8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtype_follows_input(dtype: torch.dtype) -> None:
    layer = make(width=16)
    layer.begin_step(0)
    x = torch.randn(8, 16, dtype=dtype)
    out = layer(x)
    assert out.dtype == dtype
    expected = (x.double() * layer.masks().double()[torch.arange(8) * 4 // 8]).to(dtype)
    assert torch.equal(out, expected)  # masks hold exact 0 and 2 at p = 0.5


def test_device_follows_input() -> None:
    devices = ["meta"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        x = torch.ones(8, 16, device=device)
        out = gyro_dropout(x, torch.ones(4, 16))
        assert out.device == x.device
    if torch.cuda.is_available():
        layer = make().cuda()
        layer.begin_step(0)
        out = layer(torch.ones(8, 16, device="cuda"))
        assert out.device.type == "cuda" and layer.scores.device.type == "cuda"


def test_gradient_is_the_mask() -> None:
    layer = make(width=16)
    layer.begin_step(0)
    x = torch.randn(8, 16, requires_grad=True)
    layer(x).sum().backward()
    assert torch.equal(x.grad, layer.masks()[torch.arange(8) * 4 // 8])


# -- rates and scaling --------------------------------------------------------------------


def test_kept_fraction_over_the_bank_is_one_minus_p() -> None:
    p, sigma, width = 0.3, 256, 64
    layer = make(p=p, sigma=sigma, width=width)
    kept = (layer.masks(torch.arange(sigma)) > 0).float().mean().item()
    n = sigma * width
    assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)


def test_expected_scaling_keeps_the_mean() -> None:
    p, sigma, width = 0.3, 256, 64
    layer = make(p=p, sigma=sigma, width=width)
    masks = layer.masks(torch.arange(sigma))
    values = masks.unique().tolist()
    assert values[0] == 0.0 and values[1:] == [pytest.approx(1 / (1 - p))]
    # A mask value is 1/(1-p) w.p. 1-p, else 0: variance p/(1-p).
    assert abs(masks.mean().item() - 1) < 5 * math.sqrt(p / (1 - p) / masks.numel())


def test_empirical_scaling_keeps_each_masks_mean_exactly() -> None:
    layer = make(p=0.3, sigma=64, width=50, scaling="empirical")
    masks = layer.masks(torch.arange(64))
    torch.testing.assert_close(masks.mean(dim=1), torch.ones(64))
    assert torch.equal(gyro_masks(torch.zeros(2, 3), 0.5, "empirical"), torch.zeros(2, 3))


@pytest.mark.parametrize("scaling", ["expected", "empirical"])
def test_rate_zero_is_the_identity(scaling: str) -> None:
    layer = make(p=0.5, width=16, scaling=scaling)
    layer.begin_step(0)
    layer.set_rate_factor(0.0)
    x = torch.randn(8, 16)
    assert torch.equal(layer(x), x)
    zero = make(p=0.0, width=16, scaling=scaling)
    zero.begin_step(0)
    assert torch.equal(zero(x), x)


def test_eval_is_a_deterministic_identity() -> None:
    layer = make(width=16)
    layer.begin_step(0)
    layer.eval()
    x = torch.randn(8, 16)
    assert torch.equal(layer(x), x)
    assert torch.equal(layer(x), x)
    assert GyroDropout(0.5, 16, 4).eval()(x) is x  # no period or bank needed in eval


def test_a_lower_rate_keeps_a_superset_of_units() -> None:
    # A schedule moves the rate, not the bank: the subnetworks stay nested.
    layer = make(p=0.6, sigma=32, width=64)
    rows = torch.arange(32)
    previous = layer.masks(rows) > 0
    for factor in (0.75, 0.5, 0.25, 0.0):
        layer.set_rate_factor(factor)
        kept = layer.masks(rows) > 0
        assert torch.all(kept | ~previous)  # kept before -> kept now
        assert kept.sum() >= previous.sum()
        previous = kept
    assert torch.all(previous)


# -- seeds, state and resume -----------------------------------------------------------------


def test_same_seed_same_bank_and_selections_on_every_rank() -> None:
    a, b = make(seed=7, width=32), make(seed=7)
    b.begin_step(0)
    b(torch.ones(4, 32))  # lazily drawn bank, after a selection: still the same bank
    assert torch.equal(a.scores, b.scores)
    assert selections(a, range(100)) == selections(b, range(100))
    c = make(seed=8, width=32)
    assert not torch.equal(a.scores, c.scores)
    torch.manual_seed(123)  # the global RNG plays no part
    d = make(seed=7, width=32)
    assert torch.equal(a.scores, d.scores)


def run_steps(layer: GyroDropout, steps: range, batch: int = 6, width: int = 20) -> list:
    outs = []
    for step in steps:
        layer.begin_step(step)
        x = torch.arange(batch * width, dtype=torch.float32).view(batch, width) + step
        outs.append(layer(x))
        outs.append(layer(x))  # two accumulation micro-batches
    return outs


@pytest.mark.parametrize("with_replacement", [False, True])
def test_load_state_dict_mid_run_resumes_exactly(with_replacement: bool) -> None:
    # period 60 // (40 // 3) = 4: 15 periods, a permutation wrap (with a top-up) at period 13.
    kwargs = dict(p=0.4, sigma=40, tau=3, total_steps=60, with_replacement=with_replacement)
    uninterrupted = make(seed=3, **kwargs)
    reference = run_steps(uninterrupted, range(60))

    first = make(seed=3, **kwargs)  # lazy width: the bank is drawn at the first forward
    run_steps(first, range(23))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    # A fresh module with no width, no total_steps and a different seed: the state is all.
    resumed = GyroDropout(0.4, 40, 3, with_replacement=with_replacement, seed=99).train()
    resumed.load_state_dict(torch.load(buffer))
    assert resumed.period == first.period and resumed.width == 20
    after = run_steps(resumed, range(23, 60))
    assert len(after) == len(reference[2 * 23 :])
    for got, want in zip(after, reference[2 * 23 :], strict=True):
        assert torch.equal(got, want)


def test_state_dict_holds_the_method_state() -> None:
    layer = make(width=8)
    layer.begin_step(30)
    state = layer.state_dict()
    assert {"rate", "scores", "selection", "_extra_state"} <= set(state)
    extra = state["_extra_state"]
    assert extra["step"] == 30 and extra["period"] == 25 and extra["period_index"] == 1
    assert {"permutation", "position", "generator", "seed"} <= set(extra)


def test_rate_is_restored_from_the_state_dict() -> None:
    layer = make(width=8)
    layer.set_rate_factor(0.5)
    fresh = make(width=8)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.rate.item() == pytest.approx(0.25)


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "start"),
    [
        (dict(sigma=0), "sigma"),
        (dict(sigma=2.5), "sigma"),
        (dict(tau=0), "tau"),
        (dict(sigma=4, tau=5), "tau"),
        (dict(p=1.0), "p "),
        (dict(p=-0.1), "p "),
        (dict(scaling="mean"), "scaling"),
        (dict(total_steps=0), "total_steps"),
    ],
)
def test_bad_hyper_parameters(kwargs: dict, start: str) -> None:
    args = dict(p=0.5, sigma=16, tau=4) | kwargs
    with pytest.raises(ValueError) as excinfo:
        GyroDropout(**args)
    assert str(excinfo.value).startswith(start)
    with pytest.raises(ValueError) as excinfo:
        apply_gyro_dropout(nn.Sequential(DropSite("fc")), **args)
    assert str(excinfo.value).startswith(start)


def test_bad_mask_axis_and_width() -> None:
    with pytest.raises(ValueError, match="^mask_axis"):
        GyroDropout(mask_axis=0)
    with pytest.raises(ValueError, match="^width"):
        GyroDropout(width=0)


def test_training_forward_without_a_run_length_says_what_to_do() -> None:
    layer = GyroDropout(0.5, 16, 4).train()
    with pytest.raises(RuntimeError, match="setup_run.*total_steps"):
        layer(torch.ones(4, 8))
    with pytest.raises(RuntimeError, match="setup_run"):
        layer.begin_step(0)


def test_forward_without_begin_step_warns_and_uses_period_zero() -> None:
    layer = make(width=8)
    with pytest.warns(UserWarning, match="begin_step"):
        out = layer(torch.ones(4, 8))
    reference = make(width=8)
    reference.begin_step(0)
    assert torch.equal(out, reference(torch.ones(4, 8)))


# -- surgery ---------------------------------------------------------------------------------


def small_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        DropSite("conv"),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 32),
        nn.ReLU(),
        DropSite("fc"),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Dropout(0.5),  # a plain torch dropout counts as an fc site
        nn.Linear(32, 10),
    )


def test_apply_replaces_the_chosen_site_kinds() -> None:
    net = small_net()
    report = apply_gyro_dropout(net, sites=("fc", "conv"), sigma=32, tau=4, total_steps=10)
    assert isinstance(report, SurgeryReport) and len(report) == 3
    assert report.counts() == {"DropSite -> GyroDropout": 2, "Dropout -> GyroDropout": 1}
    assert [net[i].mask_axis for i in (1, 5, 8)] == [1, -1, -1]
    seeds = {net[i].seed for i in (1, 5, 8)}
    assert len(seeds) == 3  # distinct per site
    only_fc = small_net()
    apply_gyro_dropout(only_fc, total_steps=10)
    assert isinstance(only_fc[1], DropSite) and isinstance(only_fc[5], GyroDropout)


def test_apply_trains_end_to_end_with_accumulation() -> None:
    torch.manual_seed(0)
    net = small_net()
    apply_gyro_dropout(net, sites=["fc", "conv"], sigma=16, tau=4)
    for module in net.modules():
        if isinstance(module, GyroDropout):
            module.setup_run(6)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(6):
        for module in net.modules():
            if isinstance(module, GyroDropout):
                module.begin_step(step)
        for _ in range(2):
            loss = nn.functional.cross_entropy(net(torch.randn(7, 3, 4, 4)), torch.arange(7))
            loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(loss)
    net.eval()
    x = torch.randn(3, 3, 4, 4)
    assert torch.equal(net(x), net(x))


def test_apply_on_token_sites() -> None:
    net = nn.Sequential(nn.Linear(8, 16), DropSite("token"), nn.Linear(16, 4))
    apply_gyro_dropout(net, sites=("token",), sigma=8, tau=2, total_steps=4)
    net[1].begin_step(0)
    assert net(torch.randn(3, 5, 8)).shape == (3, 5, 4)
    assert net[1].width == 16


def test_same_seed_gives_the_same_model_banks() -> None:
    a, b = small_net(), small_net()
    for net in (a, b):
        apply_gyro_dropout(net, sites=("fc", "conv"), seed=5, total_steps=10)
        for i in (1, 5, 8):
            net[i].begin_step(0)
        net.train()(torch.randn(4, 3, 4, 4))  # lazily draws the banks
    for i in (1, 5, 8):
        assert torch.equal(a[i].scores, b[i].scores)
    assert not torch.equal(a[5].scores, a[8].scores)


def test_apply_errors() -> None:
    with pytest.raises(ValueError, match="^sites"):
        apply_gyro_dropout(small_net(), sites=("attn",))
    with pytest.raises(ValueError, match="^sites"):
        apply_gyro_dropout(small_net(), sites=("nonsense",))
    with pytest.raises(MethodNotApplicable, match="DropSite"):
        apply_gyro_dropout(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(MethodNotApplicable):
        apply_gyro_dropout(small_net(), sites=("token",))


def test_repr_shows_the_hyper_parameters() -> None:
    text = repr(make(p=0.3, sigma=64, tau=8, with_replacement=True, scaling="empirical"))
    for part in (
        "p=0.3",
        "sigma=64",
        "tau=8",
        "mask_axis=-1",
        "with_replacement=True",
        "scaling='empirical'",
        "period=12",
    ):
        assert part in text


def test_compiled_layer_is_not_recompiled_by_steps_or_rate_changes() -> None:
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    layer = make(width=8, total_steps=20)  # period 5
    counter = CompileCounter()
    compiled = torch.compile(layer, backend=counter)
    x = torch.randn(8, 8)
    for step in range(20):
        layer.begin_step(step)
        layer.set_rate_factor(1 - step / 20)
        assert torch.equal(compiled(x), layer(x))
    assert counter.frame_count <= 2  # the first forward's setup, then one graph


def test_a_bank_not_yet_drawn_round_trips_too() -> None:
    lazy = make(seed=4)  # no forward yet: empty bank
    sized = make(seed=0, width=8)
    sized.load_state_dict(lazy.state_dict())
    assert sized.scores.numel() == 0 and sized.width is None
    sized.begin_step(0)
    lazy.begin_step(0)
    x = torch.randn(4, 8)
    assert torch.equal(sized(x), lazy(x))
