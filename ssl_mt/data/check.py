"""Validates a dataset root before training: the csv, every image and every mask; or a
plain image folder (SSL pretraining without a csv): every image.

Loaders fail on the first bad sample, hours into a run; ``check_dataset`` reads everything
up front and names every problem with its csv line and file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ssl_mt.data.image_io import BadSampleError, read_image, read_mask
from ssl_mt.data.manifest import (
    IMAGE_EXTENSIONS,
    MANIFEST_NAME,
    SPLITS,
    ManifestError,
    Sample,
    is_hidden,
    missing_task_columns,
    parse_rows,
    read_table,
)
from ssl_mt.tasks import TaskSpec

TOTAL = "total"
# After a JPEG start-of-scan, the next real marker: 0xFF followed by anything but a stuffed
# zero, a restart marker (D0-D7) or a fill byte.
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_CHUNK = 64


@dataclass
class CheckReport:
    """What :func:`check_dataset` found.

    Attributes:
        root: The dataset root checked.
        problems: One message per problem, naming the csv line and the file.
        counts: Per task, labeled samples per split and in ``total``; the key ``samples``
            holds the number of samples per split.
        kinds: Per task, its kind (``segmentation`` / ``classification``).
        n_rows: Number of data rows in ``labels.csv``.
        samples: The rows that parsed (their sizes are summarised by ``data check``).
        n_images: Images found, when a plain image folder was checked (no csv).
        n_hidden: Hidden files named like images, skipped in a folder check.
    """

    root: Path
    problems: list[str] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    n_rows: int = 0
    samples: list[Sample] = field(default_factory=list)
    n_images: int | None = None
    n_hidden: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def check_dataset(
    root: str | Path,
    tasks: Sequence[TaskSpec],
    workers: int = 0,
    progress: bool = False,
    lossy_mask_threshold: int | None = None,
) -> CheckReport:
    """Checks ``ROOT/labels.csv`` and every file it names.

    Args:
        root: Dataset root.
        tasks: Tasks whose columns are checked.
        workers: Threads decoding files (0 = one per CPU core).
        progress: Show a progress bar over the rows.
        lossy_mask_threshold: Read masks stored lossily (JPEG) thresholded at this grey
            level, as training does with ``data.allow_lossy_masks=true``; None reports them.

    Returns:
        The report; ``report.ok`` is False when anything is wrong.
    """
    root = Path(root)
    report = CheckReport(root=root, kinds={t.name: t.kind for t in tasks})
    manifest = root / MANIFEST_NAME
    try:
        table = read_table(root)
    except ManifestError as error:
        report.problems.append(str(error))
        return report
    report.n_rows = len(table)
    missing = missing_task_columns(table, tasks)
    for task in missing:
        report.problems.append(
            f"{manifest}: no column {task.column!r} for task {task.name!r} "
            f"(columns: {list(table.columns)})"
        )
    present = [t for t in tasks if t not in missing]
    samples, problems = parse_rows(root, table, present)
    report.samples = list(samples)
    report.problems.extend(f"{manifest} {message}" for message in problems)
    report.counts = count_labels(samples, tasks)
    segmentation = [t for t in present if t.is_segmentation]
    report.problems.extend(
        _check_files(root, samples, segmentation, workers, progress, lossy_mask_threshold)
    )
    return report


def check_image_folder(root: str | Path, workers: int = 0, progress: bool = False) -> CheckReport:
    """Checks a plain image folder (SSL pretraining's ``data.source=folder``): every image
    the loader would take is decoded, and every one that cannot be is named.

    Args:
        root: The folder (searched recursively, hidden files skipped as the loader does).
        workers: Threads decoding files (0 = one per CPU core).
        progress: Show a progress bar over the images.
    """
    root = Path(root)
    report = CheckReport(root=root)
    if not root.is_dir():
        report.problems.append(f"{root}: not a folder")
        return report
    candidates = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS]
    images = sorted(p for p in candidates if not is_hidden(p, root) and p.is_file())
    report.n_images, report.n_hidden = len(images), len(candidates) - len(images)
    if not images:
        report.problems.append(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
        return report

    def problems(chunk: Sequence[Path]) -> list[str]:
        found = []
        for path in chunk:
            try:
                _decode_image(path)
            except BadSampleError as error:
                found.append(str(error))
        return found

    chunks = [images[i : i + _CHUNK] for i in range(0, len(images), _CHUNK)]
    bar = tqdm(total=len(images), desc="check", unit="img", disable=not progress)
    with bar, ThreadPoolExecutor(max(1, workers or os.cpu_count() or 1)) as pool:
        for chunk, found in zip(chunks, pool.map(problems, chunks), strict=True):
            bar.update(len(chunk))
            report.problems.extend(found)
    return report


def count_labels(samples: Sequence[Sample], tasks: Sequence[TaskSpec]) -> dict[str, dict[str, int]]:
    """Labeled samples per task and split (plus ``total``), and samples per split."""
    counts = {"samples": _zero_counts()}
    for task in tasks:
        counts[task.name] = _zero_counts()
    for sample in samples:
        for key in ("samples", *(t.name for t in tasks)):
            if key == "samples" or sample.labels.get(key) is not None:
                counts[key][sample.split] += 1
                counts[key][TOTAL] += 1
    return counts


def _zero_counts() -> dict[str, int]:
    return dict.fromkeys((*SPLITS, TOTAL), 0)


def _check_files(
    root: Path,
    samples: Sequence[Sample],
    tasks: Sequence[TaskSpec],
    workers: int,
    progress: bool,
    lossy_mask_threshold: int | None = None,
) -> Iterator[str]:
    """Decodes every image and mask on a thread pool (OpenCV releases the GIL)."""
    chunks = [samples[i : i + _CHUNK] for i in range(0, len(samples), _CHUNK)]
    workers = max(1, workers or os.cpu_count() or 1)
    bar = tqdm(total=len(samples), desc="check", unit="row", disable=not progress)
    with bar, ThreadPoolExecutor(workers) as pool:
        for chunk, problems in zip(
            chunks,
            pool.map(lambda c: _check_chunk(root, c, tasks, lossy_mask_threshold), chunks),
            strict=True,
        ):
            bar.update(len(chunk))
            yield from problems


def _check_chunk(
    root: Path,
    samples: Sequence[Sample],
    tasks: Sequence[TaskSpec],
    lossy_mask_threshold: int | None,
) -> list[str]:
    return [
        problem
        for sample in samples
        for problem in check_sample(root, sample, tasks, lossy_mask_threshold)
    ]


def check_sample(
    root: Path,
    sample: Sample,
    tasks: Sequence[TaskSpec],
    lossy_mask_threshold: int | None = None,
) -> list[str]:
    """Problems of one sample's image and masks; each names the csv line and the file."""
    where = f"{root / MANIFEST_NAME} row {sample.row}"
    problems = []
    hw = None
    try:
        hw = _decode_image(sample.image)
    except BadSampleError as error:
        problems.append(f"{where}, column image: {error}")
    for task in tasks:
        mask = sample.labels.get(task.name)
        if mask is None:
            continue
        try:
            read_mask(mask, expected_hw=hw, lossy_threshold=lossy_mask_threshold)
        except BadSampleError as error:
            problems.append(f"{where}, column {task.column}: {error}")
    return problems


def _decode_image(path: Path) -> tuple[int, int]:
    """Fully decodes an image, catching truncated JPEGs that OpenCV decodes silently.

    Returns:
        The image's height and width.
    """
    if path.suffix.lower() in (".jpg", ".jpeg") and path.is_file():
        reason = jpeg_defect(path.read_bytes())
        if reason:
            raise BadSampleError(f"corrupt JPEG {path}: {reason}", path)
    return read_image(path).shape[:2]


def jpeg_defect(data: bytes) -> str | None:
    """Walks the JPEG segments to the end-of-image marker.

    OpenCV (libjpeg) decodes a truncated JPEG without an error, filling the missing part
    with grey, so a cut-off download would train as a valid image.

    Returns:
        None for a complete JPEG, otherwise what is wrong.
    """
    if data[:2] != b"\xff\xd8":
        return "no JPEG start-of-image marker"
    pos, size = 2, len(data)
    while pos + 1 < size:
        if data[pos] != 0xFF:  # stray bytes between segments: libjpeg skips them too
            pos = data.find(b"\xff", pos)
            if pos < 0:
                break
            continue
        marker = data[pos + 1]
        pos += 2
        if marker == 0xFF:  # fill byte
            pos -= 1
            continue
        if marker == 0xD9:
            return None
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            continue
        if pos + 2 > size:
            break
        pos += int.from_bytes(data[pos : pos + 2], "big")
        if marker == 0xDA:  # start of scan: skip the entropy-coded data
            found = _JPEG_MARKER.search(data, pos)
            if found is None:
                break
            pos = found.start()
    return "truncated (no end-of-image marker)"


def format_report(report: CheckReport) -> str:
    """Renders the per-task label counts and then every problem."""
    if report.n_images is not None:
        return _format_folder_report(report)
    if not report.counts:  # the manifest itself could not be read
        problems = "\n".join(f"  {problem}" for problem in report.problems)
        return f"{report.root}: {len(report.problems)} problem(s):\n{problems}"
    lines = [
        f"{report.root / MANIFEST_NAME}: {report.n_rows} rows; labeled samples per task and split",
        *label_table(report.counts, report.kinds),
    ]
    return "\n".join([*lines, "", *_problem_lines(report)])


def _format_folder_report(report: CheckReport) -> str:
    hidden = f" ({report.n_hidden} hidden file(s) skipped)" if report.n_hidden else ""
    lines = [f"{report.root}: image folder, {report.n_images} image(s){hidden}"]
    return "\n".join([*lines, *_problem_lines(report)])


def _problem_lines(report: CheckReport) -> list[str]:
    if report.ok:
        return ["no problems found"]
    return [f"{len(report.problems)} problem(s):", *(f"  {p}" for p in report.problems)]


def label_table(counts: dict[str, dict[str, int]], kinds: dict[str, str]) -> list[str]:
    """Lines of a table: samples per split, then labeled samples per task and split.

    Args:
        counts: As :func:`count_labels` returns.
        kinds: Task name -> kind, in the order the rows are shown.
    """
    header = ("task", "kind", *SPLITS, TOTAL, "labeled")
    samples = counts.get("samples", _zero_counts())
    rows = [("samples", "", *(str(samples[s]) for s in (*SPLITS, TOTAL)), "")]
    for name, kind in kinds.items():
        task_counts = counts.get(name, _zero_counts())
        share = 100.0 * task_counts[TOTAL] / samples[TOTAL] if samples[TOTAL] else 0.0
        rows.append((name, kind, *(str(task_counts[s]) for s in (*SPLITS, TOTAL)), f"{share:.1f}%"))
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    lines = [
        "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    for row in rows:
        cells = [
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines
