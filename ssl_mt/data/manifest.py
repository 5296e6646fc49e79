"""The dataset format users bring: ``ROOT/labels.csv`` plus images and masks under ROOT.

``labels.csv`` has an ``image`` column, an optional ``split`` column (train / val / test)
and one column per task (see :mod:`ssl_mt.tasks`). Paths are relative to ROOT. An empty
cell means the sample is not labeled for that task. Class labels are an index or a class
name from the task config. Without a ``split`` column, a deterministic split is derived from
a hash of the file name, so it never changes between runs or machines.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ssl_mt.tasks import TaskSpec

log = logging.getLogger(__name__)

MANIFEST_NAME = "labels.csv"
SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
LOSSY_MASK_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif")


class ManifestError(ValueError):
    """``labels.csv`` cannot be used; the message names every offending row and column."""


@dataclass(frozen=True)
class Sample:
    """One row of the manifest, parsed.

    Attributes:
        image: Absolute path of the image.
        split: ``train``, ``val`` or ``test``.
        row: Line number in ``labels.csv`` (header = line 1), for error messages.
        labels: Per task: a class index, a mask path, or ``None`` when unlabeled.
    """

    image: Path
    split: str
    row: int
    labels: dict[str, int | Path | None] = field(default_factory=dict)


def csv_line(index: int) -> int:
    """Line number in the csv of the DataFrame row ``index`` (the header is line 1)."""
    return index + 2


def hash_split(name: str, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split of one file name: the same name always lands in the same split."""
    digest = hashlib.sha1(name.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def read_table(root: Path) -> pd.DataFrame:
    """Reads ``ROOT/labels.csv`` with every cell as a string ('' = empty)."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"no manifest at {path}: a dataset root needs {MANIFEST_NAME}")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise ManifestError(f"{path}: not a readable csv ({error})") from error
    table.columns = [c.strip() for c in table.columns]
    if "image" not in table.columns:
        raise ManifestError(f"{path}: missing the `image` column (columns: {list(table.columns)})")
    return table


def missing_task_columns(table: pd.DataFrame, tasks: Sequence[TaskSpec]) -> list[TaskSpec]:
    return [t for t in tasks if t.column not in table.columns]


def parse_rows(
    root: Path,
    table: pd.DataFrame,
    tasks: Sequence[TaskSpec],
    val_fraction: float = 0.1,
    test_fraction: float = 0.0,
) -> tuple[list[Sample], list[str]]:
    """Parses every row; returns the samples and one message per problem found.

    Only the csv content is checked here (labels, splits, duplicates); files on disk are the
    business of :func:`ssl_mt.data.check.check_dataset` and of the loaders.
    """
    root = Path(root)
    problems: list[str] = []
    samples: list[Sample] = []
    has_split = "split" in table.columns
    seen: dict[str, int] = {}
    columns = {t.name: table[t.column].tolist() for t in tasks if t.column in table.columns}
    images = table["image"].tolist()
    splits = table["split"].tolist() if has_split else None
    for i, image in enumerate(images):
        line = csv_line(i)
        image = image.strip()
        if not image:
            problems.append(f"row {line}: empty `image` cell")
            continue
        if image in seen:
            problems.append(f"row {line}: duplicate of row {seen[image]} (image {image})")
            continue
        seen[image] = line
        if splits is not None and splits[i].strip():
            split = splits[i].strip().lower()
            if split not in SPLITS:
                problems.append(f"row {line}: unknown split {splits[i]!r} (use {list(SPLITS)})")
                continue
        else:
            split = hash_split(Path(image).name, val_fraction, test_fraction)
        labels: dict[str, int | Path | None] = {}
        for task in tasks:
            cell = columns[task.name][i].strip() if task.name in columns else ""
            if not cell:
                labels[task.name] = None
            elif task.is_segmentation:
                labels[task.name] = root / cell
            else:
                try:
                    labels[task.name] = task.class_index(cell)
                except ValueError as error:
                    problems.append(f"row {line} ({image}), column {task.column}: {error}")
                    labels[task.name] = None
        samples.append(Sample(image=root / image, split=split, row=line, labels=labels))
    return samples, problems


def load_manifest(
    root: str | Path,
    tasks: Sequence[TaskSpec],
    splits: Sequence[str] | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.0,
    require_columns: bool = True,
) -> list[Sample]:
    """Loads and validates ``ROOT/labels.csv``.

    Args:
        root: Dataset root.
        tasks: Tasks whose columns are parsed.
        splits: Keep only these splits (all when None).
        val_fraction: Share of files sent to ``val`` when there is no ``split`` column.
        test_fraction: Share of files sent to ``test`` when there is no ``split`` column.
        require_columns: Fail when a task has no column (fine-tuning needs every column;
            the kNN monitor of pretraining uses what is there).

    Raises:
        ManifestError: listing every problem with its csv line.
    """
    root = Path(root)
    table = read_table(root)
    missing = missing_task_columns(table, tasks)
    if missing and require_columns:
        names = ", ".join(f"{t.name} (column {t.column!r})" for t in missing)
        raise ManifestError(
            f"{root / MANIFEST_NAME}: no column for task(s) {names}. Add the column (empty "
            f"cells are fine) or remove the task from the config (e.g. `tasks.{missing[0].name}=null`)."
        )
    present = [t for t in tasks if t not in missing]
    samples, problems = parse_rows(root, table, present, val_fraction, test_fraction)
    if problems:
        shown = "\n  ".join(problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise ManifestError(
            f"{root / MANIFEST_NAME}: {len(problems)} problem(s):\n  {shown}{more}\n"
            f"Run `python -m ssl_mt.data check {root}` for a full report."
        )
    if splits is not None:
        samples = [s for s in samples if s.split in splits]
    return samples


def refuse_lossy_masks(root: Path, samples: Sequence[Sample], tasks: Sequence[TaskSpec]) -> None:
    """Fails, naming every row, when masks are JPEG files (by name: no file is opened).

    A mask stored as JPEG under another name is refused when it is read
    (:func:`ssl_mt.data.image_io.read_mask`); ``data check`` reads every file.

    Raises:
        ManifestError: listing the rows and columns of the JPEG masks.
    """
    problems = [
        f"row {sample.row}, column {task.column}: {path}"
        for sample in samples
        for task in tasks
        if task.is_segmentation
        and (path := sample.labels.get(task.name)) is not None
        and Path(path).suffix.lower() in LOSSY_MASK_EXTENSIONS
    ]
    if problems:
        shown = "\n  ".join(problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise ManifestError(
            f"{Path(root) / MANIFEST_NAME}: {len(problems)} mask(s) stored as JPEG, a lossy "
            f"format whose compression noise would become foreground:\n  {shown}{more}\n"
            "Save masks as PNG, or set data.allow_lossy_masks=true to read them thresholded "
            "at data.lossy_mask_threshold."
        )


def is_hidden(path: Path, root: Path) -> bool:
    """Whether a file below ``root`` is hidden: a name, or a folder on its way, starting
    with a dot. Covers macOS ``._*`` resource-fork companions and ``.DS_Store``."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def list_image_folder(root: str | Path) -> list[Path]:
    """Every image below ``root`` (recursive, sorted), for SSL pretraining without a csv.

    Hidden files and folders (names starting with a dot, e.g. macOS ``._photo.jpg``
    companions, which only look like images) are skipped, and their number logged.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    candidates = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS]
    files = sorted(p for p in candidates if not is_hidden(p, root) and p.is_file())
    skipped = len(candidates) - len(files)
    if skipped:
        log.info(
            "%s: skipped %d hidden file(s) or folder(s) named like images (names starting "
            "with '.', e.g. macOS '._*' companions)",
            root,
            skipped,
        )
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found below {root}")
    return files
