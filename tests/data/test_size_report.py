"""``data check`` reports median image and mask sizes and, when far above training, `prepare`."""

from __future__ import annotations

import functools
from pathlib import Path

import cv2
import numpy as np

from ssl_mt.config import load_group
from ssl_mt.data.__main__ import main
from ssl_mt.data.image_io import write_png
from ssl_mt.data.manifest import load_manifest
from ssl_mt.data.size_report import format_sizes, prepare_side, summarize_sizes


@functools.cache
def augments() -> list:
    return [load_group("augment", name) for name in ("skin", "finetune")]


def big_root(tmp_path: Path, width: int = 1600, height: int = 1200) -> Path:
    rows = []
    for i in range(3):
        image = np.full((height, width, 3), 40 * i, np.uint8)
        cv2.imwrite(str(tmp_path / f"{i}.jpg"), image)
        write_png(tmp_path / f"{i}_skin.png", np.zeros((height, width), np.uint8))
        rows.append(f"{i}.jpg,{'val' if i == 2 else 'train'},{i}_skin.png,,sharp,1,relevant")
    header = "image,split,skin_mask,scalp_mask,blur,tone,relevance"
    (tmp_path / "labels.csv").write_text("\n".join([header, *rows]) + "\n")
    return tmp_path


def test_sizes_and_the_prepare_advice(tmp_path: Path, default_tasks) -> None:
    root = big_root(tmp_path)
    summary = summarize_sizes(load_manifest(root, default_tasks), default_tasks)
    assert summary.image_hw == summary.mask_hw == (1200, 1600)
    assert (summary.images, summary.masks) == (3, 3)
    # skin's 20% crop at 96 px needs sqrt(0.2 * A / (4/3)) >= 96: A >= 61,440 px.
    side = prepare_side((1200, 1600), 96, augments())
    assert side == 288  # 288 x 216 = 62,208 px; 256 x 192 = 49,152 px is too small
    lines = format_sizes(summary, 96, augments(), root)
    assert "median image 1600x1200" in lines[0] and "median mask 1600x1200" in lines[0]
    assert f"prepare {root} --max-side 288" in lines[1] and "per mask" in lines[1]
    assert "masks are PNGs" in lines[2]
    # At the training size the images are not far above: no advice.
    assert len(format_sizes(summary, 768, augments(), root)) == 1


def test_check_cli_prints_the_sizes(tmp_path: Path, capsys) -> None:
    root = big_root(tmp_path, 640, 480)
    assert main(["check", str(root), "--train-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "median image 640x480" in out and "--max-side" in out
