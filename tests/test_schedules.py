"""Drop-rate schedules follow the definitions of Liu et al. (2023) exactly."""

import math

import numpy as np
import pytest
from omegaconf import OmegaConf

from regdrop.errors import ConfigError
from regdrop.schedules import DropSchedule, steps_per_epoch


def build(steps_per_epoch: int, **cfg) -> DropSchedule:
    return DropSchedule.from_config(OmegaConf.create(cfg), steps_per_epoch)


def test_constant_is_one_everywhere():
    assert build(10, name="constant").factors(50) == [1.0] * 50


@pytest.mark.parametrize("cutoff_epoch, per_epoch, cutoff_steps", [(2, 10, 20), (0.5, 10, 5), (1.25, 8, 10), (0.33, 10, 3)])
def test_early_constant_drops_to_zero_at_the_cutoff(cutoff_epoch, per_epoch, cutoff_steps):
    factors = build(per_epoch, name="early", shape="constant", cutoff_epoch=cutoff_epoch).factors(40)
    assert factors == [1.0] * cutoff_steps + [0.0] * (40 - cutoff_steps)


@pytest.mark.parametrize("cutoff_epoch, per_epoch", [(2, 10), (0.5, 10), (1.5, 7)])
def test_early_linear_is_the_official_linspace(cutoff_epoch, per_epoch):
    n = math.floor(cutoff_epoch * per_epoch + 0.5)
    factors = build(per_epoch, name="early", shape="linear", cutoff_epoch=cutoff_epoch).factors(n + 10)
    expected = np.concatenate([np.linspace(1.0, 0.0, n), np.zeros(10)])
    np.testing.assert_allclose(factors, expected, rtol=0, atol=1e-12)
    assert factors[0] == 1.0 and factors[n - 1] == 0.0  # both ends exactly


def test_late_is_zero_then_peak():
    factors = build(4, name="late", cutoff_epoch=2.5).factors(16)
    assert factors == [0.0] * 10 + [1.0] * 6


def test_warmup_reaches_the_peak_exactly():
    factors = build(10, name="warmup", warmup_epochs=1).factors(15)
    np.testing.assert_allclose(factors[:10], np.linspace(0, 1, 10), atol=1e-12)
    assert factors[9] == 1.0 and factors[10:] == [1.0] * 5


def test_steps_per_epoch_counts_optimizer_steps():
    assert steps_per_epoch(60000, 128) == 468
    assert steps_per_epoch(60000, 128, grad_accum=4) == 117
    assert steps_per_epoch(60000, 128, grad_accum=2, world_size=2) == 117
    assert steps_per_epoch(1000, 64, 1, 1) == 15


@pytest.mark.parametrize(
    "cfg, key",
    [
        ({"name": "early", "shape": "cosine", "cutoff_epoch": 1}, "schedule.shape"),
        ({"name": "early", "shape": "linear", "cutof_epoch": 1}, "schedule.cutof_epoch"),
        ({"name": "late", "cutoff_epoch": -1}, "schedule.cutoff_epoch"),
        ({"name": "sometimes"}, "schedule.name"),
    ],
)
def test_bad_schedules_name_the_key(cfg, key):
    with pytest.raises(ConfigError) as err:
        DropSchedule.from_config(OmegaConf.create(cfg), 10)
    assert err.value.key == key


def test_the_schedule_is_a_pure_function_of_the_step():
    # A resumed run asks for the rate at its step without replaying earlier steps.
    schedule = build(7, name="early", shape="linear", cutoff_epoch=2.5)
    in_order = schedule.factors(40)
    rng = np.random.default_rng(0)
    for step in rng.permutation(40):
        assert schedule.factor(int(step)) == in_order[step]


@pytest.mark.parametrize("epochs, per_epoch, steps", [(0.5, 5, 3), (2.5, 3, 8), (0.5, 3, 2), (1.25, 2, 3)])
def test_cutoff_steps_round_half_up(epochs, per_epoch, steps):
    assert build(per_epoch, name="late", cutoff_epoch=epochs).steps == steps


def test_a_one_step_warmup_is_linspace_too():
    assert build(1, name="warmup", warmup_epochs=1).factors(3) == [0.0, 1.0, 1.0]
