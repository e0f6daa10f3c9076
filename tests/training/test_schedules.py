"""Cyclical schedule (Zhang et al., 2020): formula values, phases, collection steps, temperature control, resume."""

import io
import math

import pytest
import torch

from ptyl.errors import InvalidValueError
from ptyl.training.schedules import CyclicalSchedule, cyclical_lr
from ptyl.training.sgld import SGLD


def paper_lr(k: int, total: int, cycles: int, lr0: float) -> float:
    """Eq. (1) of the paper, with its one-based k."""
    length = math.ceil(total / cycles)
    return lr0 / 2 * (math.cos(math.pi * ((k - 1) % length) / length) + 1)


def test_known_values():
    # K = 100, M = 4: cycles of 25 steps.
    assert cyclical_lr(0, 100, 4, 0.2) == pytest.approx(0.2)
    assert cyclical_lr(25, 100, 4, 0.2) == pytest.approx(0.2)  # restart
    assert cyclical_lr(50, 100, 4, 0.2) == pytest.approx(0.2)
    assert cyclical_lr(24, 100, 4, 0.2) == pytest.approx(0.1 * (math.cos(math.pi * 24 / 25) + 1))
    # Half-way through a 10-step cycle the cosine is 0: lr0 / 2.
    assert cyclical_lr(5, 20, 2, 1.0) == pytest.approx(0.5)
    assert cyclical_lr(15, 20, 2, 1.0) == pytest.approx(0.5)
    # K not a multiple of M: ceil(10 / 3) = 4.
    assert cyclical_lr(4, 10, 3, 1.0) == pytest.approx(1.0)
    assert cyclical_lr(2, 10, 3, 1.0) == pytest.approx(0.5)


@pytest.mark.parametrize("total, cycles", [(100, 4), (10, 3), (7, 7), (50, 1)])
def test_matches_paper_formula(total, cycles):
    for k in range(1, total + 1):
        assert cyclical_lr(k - 1, total, cycles, 0.3) == pytest.approx(paper_lr(k, total, cycles, 0.3), abs=1e-15)


@pytest.mark.parametrize(
    "args", [(-1, 10, 2, 0.1), (0, 0, 1, 0.1), (0, 10, 0, 0.1), (0, 10, 11, 0.1), (0, 10, 2, 0.0), (0, 10, 2, -1.0)]
)
def test_cyclical_lr_invalid(args):
    with pytest.raises(InvalidValueError):
        cyclical_lr(*args)


def make(total=40, cycles=4, beta=0.5, temperature=1.0):
    param = torch.nn.Parameter(torch.zeros(3))
    sampler = SGLD(
        [{"params": [param]}, {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.01, "temperature": 0.5}],
        lr=0.1, num_data=10, temperature=temperature,
    )
    return sampler, CyclicalSchedule(sampler, total_steps=total, num_cycles=cycles, exploration_fraction=beta)


def test_schedule_drives_lr_phase_and_temperature():
    sampler, schedule = make()  # cycles of 10 steps, explore positions 0-4, sample positions 5-9
    for step in range(40):
        assert schedule.last_epoch == step
        assert schedule.cycle == step // 10
        factor = cyclical_lr(step, 40, 4, 1.0)
        assert sampler.param_groups[0]["lr"] == pytest.approx(0.1 * factor)
        assert sampler.param_groups[1]["lr"] == pytest.approx(0.01 * factor)
        sampling = step % 10 >= 5
        assert schedule.in_sampling_phase() == sampling
        assert schedule.temperature_factor() == (1.0 if sampling else 0.0)
        # Per-group base temperatures are kept: 1.0 and 0.5 while sampling, 0 (SGD) while exploring.
        assert sampler.param_groups[0]["temperature"] == (1.0 if sampling else 0.0)
        assert sampler.param_groups[1]["temperature"] == (0.5 if sampling else 0.0)
        sampler.step()
        schedule.step()


def test_control_temperature_off_and_explicit_apply():
    sampler = SGLD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, num_data=1, temperature=2.0)
    schedule = CyclicalSchedule(sampler, 20, 2, control_temperature=False)
    assert sampler.param_groups[0]["temperature"] == 2.0  # untouched during exploration
    schedule.apply_to_sgld()
    assert sampler.param_groups[0]["temperature"] == 0.0


def test_plain_sgd_optimizer_is_supported():
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    schedule = CyclicalSchedule(sgd, 20, 2)
    sgd.step()
    schedule.step()
    assert sgd.param_groups[0]["lr"] == pytest.approx(cyclical_lr(1, 20, 2, 0.5))
    assert "temperature" not in sgd.param_groups[0]


@pytest.mark.parametrize(
    "beta, per_cycle, expected",
    [(0.5, 1, [9]), (0.5, 2, [6, 9]), (0.5, 5, [5, 6, 7, 8, 9]), (0.0, 2, [4, 9]), (0.3, 7, [3, 4, 5, 6, 7, 8, 9])],
)
def test_collection_positions_even_and_end_of_cycle(beta, per_cycle, expected):
    _, schedule = make(beta=beta)
    assert schedule.collection_positions(per_cycle) == expected
    steps = schedule.collection_steps(per_cycle)
    assert steps == [c * 10 + p for c in range(4) for p in expected]
    seen = []
    for step in range(40):
        if schedule.should_collect(per_cycle):
            assert schedule.in_sampling_phase()
            seen.append(step)
        schedule.optimizer.step()
        schedule.step()
    assert seen == steps


def test_truncated_last_cycle():
    # K = 10, M = 3 -> cycles of 4; the last cycle (steps 8, 9) is truncated and only explores.
    _, schedule = make(total=10, cycles=3, beta=0.5)
    assert schedule.collection_steps(1) == [3, 7]


def test_invalid_schedule_arguments():
    sampler, _ = make()
    with pytest.raises(InvalidValueError):
        CyclicalSchedule(sampler, 10, 2, exploration_fraction=1.0)
    with pytest.raises(InvalidValueError, match="no sampling step"):
        CyclicalSchedule(sampler, 6, 2, exploration_fraction=0.9)  # cycles of 3: position 2 is < 0.9
    _, schedule = make()
    with pytest.raises(InvalidValueError, match="samples_per_cycle"):
        schedule.should_collect(6)  # only 5 sampling steps per cycle
    with pytest.raises(InvalidValueError):
        schedule.should_collect(0)


def test_state_dict_round_trip_resumes_identically():
    sampler, schedule = make()
    for _ in range(13):
        sampler.step()
        schedule.step()
    buffer = io.BytesIO()
    torch.save({"sampler": sampler.state_dict(), "schedule": schedule.state_dict()}, buffer)
    expected = []
    for _ in range(10):
        expected.append((sampler.param_groups[0]["lr"], sampler.param_groups[1]["temperature"], schedule.cycle))
        sampler.step()
        schedule.step()

    # Fresh objects built from a different config, then restored.
    sampler2, schedule2 = make(temperature=3.0)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    sampler2.load_state_dict(saved["sampler"])
    schedule2.load_state_dict(saved["schedule"])
    assert schedule2.last_epoch == 13
    resumed = []
    for _ in range(10):
        resumed.append((sampler2.param_groups[0]["lr"], sampler2.param_groups[1]["temperature"], schedule2.cycle))
        sampler2.step()
        schedule2.step()
    assert resumed == expected
