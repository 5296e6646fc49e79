"""Task declarations: ``conf/tasks`` parses into specs, bad configs name ``tasks.<name>.<key>``."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from ssl_mt.config import load_tasks_config
from ssl_mt.tasks import TaskConfigError, TaskSpec, parse_tasks

TONE_CLASSES = tuple(f"monk_{i:02d}" for i in range(1, 11))


def _base() -> dict[str, Any]:
    return {
        "skin": {"kind": "segmentation", "column": "skin_mask", "metrics": ["iou"]},
        "blur": {"kind": "classification", "classes": ["sharp", "slight", "strong"]},
    }


def _with(task: str, **entry: Any) -> dict[str, Any]:
    config = _base()
    config[task] = {**copy.deepcopy(config.get(task, {})), **entry}
    return config


# --------------------------------------------------------------------------- default config


def test_default_config_declares_the_five_tasks() -> None:
    tasks = {t.name: t for t in parse_tasks(load_tasks_config("default"))}
    assert list(tasks) == ["skin", "scalp", "blur", "tone", "relevance"]

    for name, column in (("skin", "skin_mask"), ("scalp", "scalp_mask")):
        assert tasks[name].kind == "segmentation"
        assert tasks[name].is_segmentation
        assert tasks[name].column == column
        assert tasks[name].num_classes == 1
        assert tasks[name].classes == ()

    assert tasks["blur"].classes == ("sharp", "slight", "strong")
    assert tasks["tone"].classes == TONE_CLASSES
    assert tasks["relevance"].classes == ("irrelevant", "relevant")
    for name, n in (("blur", 3), ("tone", 10), ("relevance", 2)):
        assert tasks[name].kind == "classification"
        assert not tasks[name].is_segmentation
        assert tasks[name].column == name
        assert tasks[name].num_classes == n
    assert "top5" in tasks["tone"].metrics
    assert all(t.loss_weight == 1.0 for t in tasks.values())


def test_null_removes_a_task() -> None:
    names = [t.name for t in parse_tasks(load_tasks_config("classification_only"))]
    assert names == ["blur", "tone", "relevance"]

    config = load_tasks_config("default")
    config.tone = None
    assert [t.name for t in parse_tasks(config)] == ["skin", "scalp", "blur", "relevance"]


def test_column_defaults_to_task_name() -> None:
    (blur,) = [t for t in parse_tasks(_base()) if t.name == "blur"]
    assert blur.column == "blur"
    assert blur.metrics == ("top1", "top5", "f1")  # all metrics of the kind when unset


def test_no_task_left_is_an_error() -> None:
    with pytest.raises(TaskConfigError, match="empty"):
        parse_tasks({})
    with pytest.raises(TaskConfigError, match="at least one task"):
        parse_tasks({"skin": None, "blur": None})


# --------------------------------------------------------------------------- class_index


@pytest.fixture
def tone(default_tasks: list[TaskSpec]) -> TaskSpec:
    return next(t for t in default_tasks if t.name == "tone")


@pytest.mark.parametrize(
    ("cell", "index"),
    [("3", 3), ("3.0", 3), (" 3 ", 3), ("0", 0), ("9", 9), ("monk_04", 3), ("monk_10", 9)],
)
def test_class_index_accepts_indices_and_names(tone: TaskSpec, cell: str, index: int) -> None:
    assert tone.class_index(cell) == index


@pytest.mark.parametrize(
    ("cell", "words"),
    [
        ("10", "out of range"),
        ("-1", "out of range"),
        ("2.5", "out of range"),
        ("nan", "out of range"),
        ("monk_11", "unknown class"),
        ("Monk_01", "unknown class"),
        ("three", "unknown class"),
    ],
)
def test_class_index_rejects_bad_cells(tone: TaskSpec, cell: str, words: str) -> None:
    with pytest.raises(ValueError, match=words) as info:
        tone.class_index(cell)
    message = str(info.value)
    assert "'tone'" in message
    assert cell.strip() in message
    assert "0..9" in message


def test_class_names_that_look_like_indices_win() -> None:
    spec = TaskSpec(name="grade", kind="classification", column="grade", classes=("1", "2", "3"))
    assert spec.class_index("1") == 0
    assert spec.class_index("0") == 0  # not a name: read as an index
    assert spec.class_index("3") == 2


# --------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    ("config", "pattern"),
    [
        (_with("blur", colour="red"), r"tasks\.blur: unknown key.*colour"),
        (_with("blur", kind="regression"), r"tasks\.blur\.kind .*'regression'"),
        ({"blur": {"classes": ["a", "b"]}}, r"tasks\.blur\.kind .*None"),
        (_with("blur", classes=["only"]), r"tasks\.blur\.classes needs at least two"),
        (_with("blur", classes=None), r"tasks\.blur\.classes needs at least two"),
        (_with("blur", classes=["a", "b", "a"]), r"tasks\.blur\.classes has duplicate"),
        (_with("skin", classes=["a", "b"]), r"tasks\.skin: segmentation .* no `classes`"),
        (_with("blur", metrics=["top1", "iou"]), r"tasks\.blur\.metrics: unknown \['iou'\]"),
        (_with("skin", metrics=["top1"]), r"tasks\.skin\.metrics: unknown \['top1'\]"),
        (_with("blur", loss_weight=-0.5), r"tasks\.blur\.loss_weight must be >= 0.*-0\.5"),
        (_with("blur", label_smoothing=1.0), r"tasks\.blur\.label_smoothing must be in"),
        (_with("blur", label_smoothing=-0.1), r"tasks\.blur\.label_smoothing must be in"),
    ],
)
def test_config_errors_name_the_task_and_key(config: dict[str, Any], pattern: str) -> None:
    with pytest.raises(TaskConfigError, match=pattern):
        parse_tasks(config)


def test_config_errors_through_omegaconf(tmp_path) -> None:
    """The same checks apply to a DictConfig loaded from a YAML file."""
    path = tmp_path / "tasks" / "mine.yaml"
    path.parent.mkdir()
    path.write_text("blur:\n  kind: classification\n  classes: [a, b]\n  weight: 2\n")
    with pytest.raises(TaskConfigError, match=r"tasks\.blur: unknown key.*weight"):
        parse_tasks(load_tasks_config(path))


def test_zero_weight_is_allowed() -> None:
    specs = parse_tasks(_with("blur", loss_weight=0))
    assert next(t for t in specs if t.name == "blur").loss_weight == 0.0
