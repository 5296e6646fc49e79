"""The progressive-resolution schedule (``ssl_mt.schedule``)."""

from __future__ import annotations

import pytest

from ssl_mt.schedule import ResolutionSchedule, ScheduleError, Stage

STAGES = [
    {"size": 64, "epochs": 3, "batch_size": 16, "aug_strength": 0.5},
    {"size": 96, "epochs": 2, "batch_size": 8},
    {"size": 128, "epochs": 1, "batch_size": 4},
]


@pytest.fixture
def schedule() -> ResolutionSchedule:
    return ResolutionSchedule(STAGES)


def test_stages_are_parsed_in_order(schedule: ResolutionSchedule):
    assert schedule.stages == (
        Stage(64, 3, 16, 0.5),
        Stage(96, 2, 8, 1.0),
        Stage(128, 1, 4, 1.0),
    )
    assert schedule.starts == (0, 3, 5)
    assert schedule.total_epochs == 6


@pytest.mark.parametrize(
    ("epoch", "index"),
    [(0, 0), (2, 0), (3, 1), (4, 1), (5, 2), (6, 2), (100, 2)],
)
def test_index_and_stage_at_boundaries(schedule: ResolutionSchedule, epoch: int, index: int):
    assert schedule.index_at(epoch) == index
    assert schedule.stage_at(epoch) == schedule.stages[index]


def test_size_changes_exactly_at_the_switch_epochs(schedule: ResolutionSchedule):
    assert schedule.switch_epochs() == [3, 5]
    sizes = [schedule.stage_at(e).size for e in range(schedule.total_epochs)]
    assert sizes == [64, 64, 64, 96, 96, 128]
    changes = [e for e in range(1, len(sizes)) if sizes[e] != sizes[e - 1]]
    assert changes == schedule.switch_epochs()


def test_single_stage_has_no_switch():
    one = ResolutionSchedule([{"size": 224, "epochs": 5, "batch_size": 2}])
    assert one.switch_epochs() == []
    assert one.index_at(0) == one.index_at(99) == 0


def test_optimizer_steps_single_process(schedule: ResolutionSchedule):
    # 100 samples, drop_last: 100 // 16 = 6, 100 // 8 = 12, 100 // 4 = 25 batches per epoch.
    assert schedule.optimizer_steps(100, world_size=1, accumulate=1) == [18, 24, 25]
    # Accumulation: a partial window at the end of an epoch still steps (ceil).
    assert schedule.optimizer_steps(100, world_size=1, accumulate=4) == [3 * 2, 2 * 3, 1 * 7]


def test_optimizer_steps_per_rank_match_distributed_sampler_with_drop_last():
    # A DistributedSampler with drop_last gives every rank floor(n / world) samples:
    # 33 samples on 2 ranks = 16 each, i.e. 2 batches of 8 (ceil(33 / 2) = 17 would also
    # be 2), and 31 samples = 15 each, i.e. 1 batch of 8 (not 2).
    sched = ResolutionSchedule([{"size": 32, "epochs": 1, "batch_size": 8}])
    assert sched.optimizer_steps(33, world_size=2, accumulate=1) == [2]
    assert sched.optimizer_steps(31, world_size=2, accumulate=1) == [1]
    assert sched.optimizer_steps(64, world_size=4, accumulate=1) == [2]


@pytest.mark.parametrize(
    ("stages", "match"),
    [
        ([{"size": 64, "epochs": 0, "batch_size": 8}], r"stages\[0\]\.epochs must be >= 1, got 0"),
        (
            [
                {"size": 64, "epochs": 1, "batch_size": 8},
                {"size": 64, "epochs": -2, "batch_size": 8},
            ],
            r"stages\[1\]\.epochs",
        ),
        ([{"size": 64, "epochs": 1, "batch_size": 0}], r"batch_size must be >= 1"),
        ([], r"schedule\.stages is empty"),
        ([{"size": 64, "epochs": 1, "batch_size": 8, "lr": 0.1}], r"unknown key.*'lr'"),
        ([{"size": 64, "epochs": 1}], r"missing \['batch_size'\]"),
        ([{"size": 64, "epochs": 1, "batch_size": 8, "aug_strength": -1}], r"aug_strength"),
    ],
    ids=[
        "zero-epochs",
        "negative-epochs-2nd",
        "zero-batch",
        "empty",
        "unknown-key",
        "missing",
        "aug",
    ],
)
def test_invalid_schedules_name_the_problem(stages, match):
    with pytest.raises(ScheduleError, match=match):
        ResolutionSchedule(stages)


@pytest.mark.parametrize(
    ("size", "multiple", "suggestion"),
    [(100, 32, 96), (240, 32, 256), (16, 32, 32), (0, 32, 32), (50, 16, 48)],
)
def test_size_not_a_multiple_names_the_multiple_and_suggests_one(size, multiple, suggestion):
    with pytest.raises(ScheduleError) as info:
        ResolutionSchedule([{"size": size, "epochs": 1, "batch_size": 2}], size_multiple=multiple)
    message = str(info.value)
    assert f"size={size}" in message
    assert f"multiple of {multiple}" in message
    assert f"e.g. {suggestion}" in message
    assert suggestion % multiple == 0
    # The suggested size is accepted.
    ResolutionSchedule([{"size": suggestion, "epochs": 1, "batch_size": 2}], size_multiple=multiple)


def test_schedule_error_is_a_value_error():
    assert issubclass(ScheduleError, ValueError)


def test_schedule_accepts_omegaconf_stages():
    from omegaconf import OmegaConf

    stages = OmegaConf.create(STAGES)
    assert ResolutionSchedule(stages).stages == ResolutionSchedule(STAGES).stages
