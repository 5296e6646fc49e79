"""Validates a dataset root before training: the csv, every image and every mask.

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
    MANIFEST_NAME,
    SPLITS,
    ManifestError,
    Sample,
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
    """

    root: Path
    problems: list[str] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    n_rows: int = 0
    samples: list[Sample] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_dataset(
    root: str | Path, tasks: Sequence[TaskSpec], workers: int = 0, progress: bool = False
) -> CheckReport:
    """Checks ``ROOT/labels.csv`` and every file it names.

    Args:
        root: Dataset root.
        tasks: Tasks whose columns are checked.
        workers: Threads decoding files (0 = one per CPU core).
        progress: Show a progress bar over the rows.

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
    report.problems.extend(_check_files(root, samples, segmentation, workers, progress))
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
) -> Iterator[str]:
    """Decodes every image and mask on a thread pool (OpenCV releases the GIL)."""
    chunks = [samples[i : i + _CHUNK] for i in range(0, len(samples), _CHUNK)]
    workers = max(1, workers or os.cpu_count() or 1)
    bar = tqdm(total=len(samples), desc="check", unit="row", disable=not progress)
    with bar, ThreadPoolExecutor(workers) as pool:
        for chunk, problems in zip(
            chunks, pool.map(lambda c: _check_chunk(root, c, tasks), chunks), strict=True
        ):
            bar.update(len(chunk))
            yield from problems


def _check_chunk(root: Path, samples: Sequence[Sample], tasks: Sequence[TaskSpec]) -> list[str]:
    return [problem for sample in samples for problem in check_sample(root, sample, tasks)]


def check_sample(root: Path, sample: Sample, tasks: Sequence[TaskSpec]) -> list[str]:
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
            read_mask(mask, expected_hw=hw)
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
    if not report.counts:  # the manifest itself could not be read
        problems = "\n".join(f"  {problem}" for problem in report.problems)
        return f"{report.root}: {len(report.problems)} problem(s):\n{problems}"
    header = ("task", "kind", *SPLITS, TOTAL, "labeled")
    samples = report.counts.get("samples", _zero_counts())
    rows = [("samples", "", *(str(samples[s]) for s in (*SPLITS, TOTAL)), "")]
    for name, kind in report.kinds.items():
        counts = report.counts.get(name, _zero_counts())
        share = 100.0 * counts[TOTAL] / samples[TOTAL] if samples[TOTAL] else 0.0
        rows.append((name, kind, *(str(counts[s]) for s in (*SPLITS, TOTAL)), f"{share:.1f}%"))
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    lines = [
        f"{report.root / MANIFEST_NAME}: {report.n_rows} rows; labeled samples per task and split",
        "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    for row in rows:
        cells = [
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    if report.ok:
        lines.append("\nno problems found")
    else:
        lines.append(f"\n{len(report.problems)} problem(s):")
        lines.extend(f"  {problem}" for problem in report.problems)
    return "\n".join(lines)
