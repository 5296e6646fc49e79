"""``labels.csv`` parsing: unlabeled cells, class labels, splits and errors with csv lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from ssl_mt.data.manifest import (
    ManifestError,
    hash_split,
    list_image_folder,
    load_manifest,
)
from ssl_mt.tasks import TaskSpec

HEADER = "image,split,skin_mask,scalp_mask,blur,tone,relevance"


def _write(root: Path, *lines: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def _error(root: Path, tasks, **kwargs) -> str:
    with pytest.raises(ManifestError) as info:
        load_manifest(root, tasks, **kwargs)
    return str(info.value)


def test_labels_unlabeled_cells_and_class_names(tmp_path: Path, default_tasks) -> None:
    root = _write(
        tmp_path,
        HEADER,
        "images/a.png,train,masks/a_skin.png,masks/a_scalp.png,sharp,monk_03,relevant",
        "images/b.png,val,,,2,9.0,0",
        "images/c.png,test,masks/c_skin.png,,,,",
    )
    a, b, c = load_manifest(root, default_tasks)

    assert a.image == root / "images/a.png"
    assert (a.split, b.split, c.split) == ("train", "val", "test")
    assert (a.row, b.row, c.row) == (2, 3, 4)
    assert a.labels == {
        "skin": root / "masks/a_skin.png",
        "scalp": root / "masks/a_scalp.png",
        "blur": 0,
        "tone": 2,
        "relevance": 1,
    }
    assert b.labels == {"skin": None, "scalp": None, "blur": 2, "tone": 9, "relevance": 0}
    assert c.labels == {
        "skin": root / "masks/c_skin.png",
        "scalp": None,
        "blur": None,
        "tone": None,
        "relevance": None,
    }


def test_spaces_and_case_are_tolerated(tmp_path: Path, default_tasks) -> None:
    root = _write(
        tmp_path,
        "image, split, skin_mask, scalp_mask, blur, tone, relevance",
        "a.png, Train, , ,  slight ,  , ",
    )
    (sample,) = load_manifest(root, default_tasks)
    assert sample.split == "train"
    assert sample.labels["blur"] == 1
    assert sample.labels["skin"] is None
    assert sample.labels["tone"] is None


def test_splits_filter(tmp_path: Path, default_tasks) -> None:
    root = _write(tmp_path, HEADER, "a.png,train,,,,,", "b.png,val,,,,,", "c.png,test,,,,,")
    assert [s.image.name for s in load_manifest(root, default_tasks, splits=["val"])] == ["b.png"]
    names = [s.image.name for s in load_manifest(root, default_tasks, splits=("train", "test"))]
    assert names == ["a.png", "c.png"]


def test_bad_class_labels_name_line_column_and_task(tmp_path: Path, default_tasks) -> None:
    root = _write(
        tmp_path,
        HEADER,
        "a.png,train,,,sharp,1,1",
        "b.png,train,,,blurry,1,1",
        "c.png,train,,,0,10,1",
        "d.png,train,,,0,1,1.5",
    )
    message = _error(root, default_tasks)
    assert "3 problem(s)" in message
    lines = [line.strip() for line in message.splitlines()]
    assert any(
        line.startswith("row 3 (b.png), column blur:") and "'blurry'" in line and "'blur'" in line
        for line in lines
    ), message
    assert any(
        line.startswith("row 4 (c.png), column tone:") and "out of range" in line for line in lines
    ), message
    assert any(line.startswith("row 5 (d.png), column relevance:") for line in lines), message
    assert not any(line.startswith("row 2 ") for line in lines), message


def test_unknown_split_and_duplicates(tmp_path: Path, default_tasks) -> None:
    root = _write(
        tmp_path,
        HEADER,
        "a.png,train,,,,,",
        "b.png,training,,,,,",
        "c.png,val,,,,,",
        "a.png,val,,,,,",
        ",val,,,,,",
    )
    message = _error(root, default_tasks)
    assert "row 3: unknown split 'training'" in message
    assert "row 5: duplicate of row 2 (image a.png)" in message
    assert "row 6: empty `image` cell" in message
    assert "3 problem(s)" in message


def test_many_problems_are_summarised(tmp_path: Path, default_tasks) -> None:
    rows = [f"img{i}.png,train,,,bad,," for i in range(60)]
    root = _write(tmp_path, HEADER, *rows)
    message = _error(root, default_tasks)
    assert "60 problem(s)" in message
    assert "... and 10 more" in message
    assert "row 51 " in message and "row 52 " not in message


def test_missing_manifest(tmp_path: Path, default_tasks) -> None:
    message = _error(tmp_path, default_tasks)
    assert str(tmp_path / "labels.csv") in message
    assert "no manifest" in message


def test_missing_image_column(tmp_path: Path, default_tasks) -> None:
    root = _write(tmp_path, "file,split,blur", "a.png,train,0")
    message = _error(root, default_tasks)
    assert "missing the `image` column" in message
    assert "'file'" in message


def test_empty_manifest_file(tmp_path: Path, default_tasks) -> None:
    tmp_path.joinpath("labels.csv").write_text("")
    message = _error(tmp_path, default_tasks)
    assert str(tmp_path / "labels.csv") in message
    assert "not a readable csv" in message


def test_missing_task_column(tmp_path: Path, default_tasks) -> None:
    root = _write(tmp_path, "image,split,skin_mask,blur,tone,relevance", "a.png,train,m.png,0,1,1")
    message = _error(root, default_tasks)
    assert "scalp (column 'scalp_mask')" in message
    assert "tasks.scalp=null" in message

    (sample,) = load_manifest(root, default_tasks, require_columns=False)
    assert sample.labels["skin"] == root / "m.png"
    assert sample.labels.get("scalp") is None
    assert sample.labels["tone"] == 1


def test_task_column_other_than_task_name(tmp_path: Path) -> None:
    task = TaskSpec(name="quality", kind="classification", column="q", classes=("bad", "good"))
    root = _write(tmp_path, "image,q", "a.png,good", "b.png,")
    a, b = load_manifest(root, [task])
    assert a.labels == {"quality": 1}
    assert b.labels == {"quality": None}


# --------------------------------------------------------------------------- split by name


def _no_split_manifest(root: Path, names: list[str]) -> Path:
    return _write(root, "image,blur", *(f"{name},0" for name in names))


def test_split_without_column_is_deterministic_by_file_name(tmp_path: Path, default_tasks) -> None:
    names = [f"img_{i:04d}.png" for i in range(400)]
    blur = [t for t in default_tasks if t.name == "blur"]
    root = _no_split_manifest(tmp_path / "one", names)
    first = {s.image.name: s.split for s in load_manifest(root, blur, val_fraction=0.25)}
    again = {s.image.name: s.split for s in load_manifest(root, blur, val_fraction=0.25)}
    assert first == again
    assert set(first.values()) == {"train", "val"}
    share = sum(split == "val" for split in first.values()) / len(first)
    assert 0.18 < share < 0.32, share

    # Same file names elsewhere, in other folders and another order: same splits.
    other = _no_split_manifest(tmp_path / "two", [f"sub/dir/{n}" for n in reversed(names)])
    moved = {s.image.name: s.split for s in load_manifest(other, blur, val_fraction=0.25)}
    assert moved == first

    # A test share carves its own files out.
    three = load_manifest(root, blur, val_fraction=0.2, test_fraction=0.2)
    counts = {split: sum(s.split == split for s in three) for split in ("train", "val", "test")}
    assert all(0.12 * 400 < counts[k] < 0.28 * 400 for k in ("val", "test")), counts
    assert all(hash_split(s.image.name, 0.2, 0.2) == s.split for s in three)


def test_empty_split_cell_falls_back_to_the_name_hash(tmp_path: Path, default_tasks) -> None:
    names = [f"x{i}.png" for i in range(50)]
    root = _write(tmp_path, HEADER, *(f"{n},,,,,," for n in names))
    samples = load_manifest(root, default_tasks, val_fraction=0.5)
    assert [s.split for s in samples] == [hash_split(n, 0.5, 0.0) for n in names]
    assert {s.split for s in samples} == {"train", "val"}


def test_hash_split_fractions() -> None:
    assert hash_split("a.png", 0.0, 0.0) == "train"
    assert hash_split("a.png", 1.0, 0.0) == "val"
    assert hash_split("a.png", 0.0, 1.0) == "test"


# --------------------------------------------------------------------------- image folders


def test_list_image_folder_is_recursive_and_sorted(tmp_path: Path) -> None:
    for relative in ("b.png", "a/c.JPG", "a/deep/d.jpeg", "z.webp", "notes.txt", "a/e.csv"):
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    found = list_image_folder(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "a/c.JPG",
        "a/deep/d.jpeg",
        "b.png",
        "z.webp",
    ]


def test_list_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_image_folder(tmp_path / "nowhere")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "readme.txt").write_text("no images")
    with pytest.raises(FileNotFoundError, match="no images"):
        list_image_folder(tmp_path)
