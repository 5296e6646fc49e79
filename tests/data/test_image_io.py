"""Image and mask decoding: RGB channel order, binary masks, errors that name the file."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from ssl_mt.data.image_io import BadSampleError, read_image, read_mask, write_png


def test_read_image_returns_rgb(tmp_path: Path) -> None:
    bgr = np.zeros((12, 20, 3), np.uint8)
    bgr[..., 2] = 255  # pure red, in OpenCV's BGR order
    bgr[:4, :5] = (255, 0, 0)  # a pure blue corner
    path = tmp_path / "red.png"
    assert cv2.imwrite(str(path), bgr)

    image = read_image(path)
    assert image.shape == (12, 20, 3)
    assert image.dtype == np.uint8
    assert (image[6, 10] == (255, 0, 0)).all()  # red first
    assert (image[0, 0] == (0, 0, 255)).all()  # blue last


def test_read_image_gray_file_becomes_three_channels(tmp_path: Path) -> None:
    path = tmp_path / "gray.png"
    assert cv2.imwrite(str(path), np.full((5, 7), 90, np.uint8))
    image = read_image(path)
    assert image.shape == (5, 7, 3)
    assert (image == 90).all()


def test_write_png_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    write_png(tmp_path / "sub" / "x.png", rgb)
    assert (read_image(tmp_path / "sub" / "x.png") == rgb).all()


def test_read_image_missing_and_corrupt(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jpg"
    with pytest.raises(BadSampleError, match="not found") as info:
        read_image(missing)
    assert str(missing) in str(info.value)
    assert info.value.path == missing

    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with pytest.raises(BadSampleError, match="corrupt or unreadable") as info:
        read_image(corrupt)
    assert str(corrupt) in str(info.value)
    assert info.value.path == corrupt

    # A directory named like an image is not an image.
    folder = tmp_path / "folder.png"
    folder.mkdir()
    with pytest.raises(BadSampleError, match=re.escape(str(folder))):
        read_image(folder)


def test_read_mask_binarises_non_zero(tmp_path: Path) -> None:
    raw = np.array([[0, 1, 2], [128, 255, 0]], np.uint8)
    path = tmp_path / "m.png"
    assert cv2.imwrite(str(path), raw)
    mask = read_mask(path, expected_hw=(2, 3))
    assert mask.dtype == np.uint8
    assert mask.tolist() == [[0, 1, 1], [1, 1, 0]]


def test_read_mask_sixteen_bit(tmp_path: Path) -> None:
    path = tmp_path / "m16.png"
    assert cv2.imwrite(str(path), np.array([[0, 256], [65535, 0]], np.uint16))
    assert read_mask(path).tolist() == [[0, 1], [1, 0]]


def test_read_mask_rejects_multichannel(tmp_path: Path) -> None:
    path = tmp_path / "rgb_mask.png"
    assert cv2.imwrite(str(path), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(BadSampleError, match="3 channels") as info:
        read_mask(path)
    assert str(path) in str(info.value)
    assert "single-channel" in str(info.value)


def test_read_mask_rejects_size_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "small.png"
    assert cv2.imwrite(str(path), np.zeros((30, 40), np.uint8))  # 40 wide, 30 high
    with pytest.raises(BadSampleError) as info:
        read_mask(path, expected_hw=(32, 48))
    message = str(info.value)
    assert str(path) in message
    assert "40x30" in message  # the mask
    assert "48x32" in message  # its image
    assert info.value.path == path
    # Transposed sizes are a mismatch too.
    with pytest.raises(BadSampleError, match="40x30"):
        read_mask(path, expected_hw=(40, 30))


def test_read_mask_missing_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(BadSampleError, match="mask not found") as info:
        read_mask(tmp_path / "gone.png")
    assert str(tmp_path / "gone.png") in str(info.value)

    corrupt = tmp_path / "bad.png"
    corrupt.write_bytes(b"garbage")
    with pytest.raises(BadSampleError, match="corrupt or unreadable mask") as info:
        read_mask(corrupt)
    assert str(corrupt) in str(info.value)
