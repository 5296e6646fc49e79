"""``python -m ssl_mt.bench``: the table and JSON are produced with every requested row.

Production, not speed: a tiny model, tiny images, 2 timed steps.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from ssl_mt.bench import (
    DATA_ROWS,
    DECODE_ROW,
    ROW_NAMES,
    STEP_ROWS,
    BenchSettings,
    format_table,
    main,
    parse_only,
    run_bench,
)

SIZES = [32, 64]
REPO = Path(__file__).resolve().parents[1]


def tiny(**overrides) -> BenchSettings:
    settings = {
        "backbone": "test_efficientnet",
        "sizes": SIZES,
        "batch_sizes": [4],
        "workers": [0],
        "steps": 2,
        "warmup": 1,
        "device": "cpu",
        "threads": 1,  # robust on a loaded machine; production, not speed, is tested
        "progress": False,
        **overrides,
    }
    return BenchSettings(**settings)


def check_rows(rows: list[dict], names: tuple[str, ...], sizes: list[int]) -> None:
    """Every requested row at every size, with finite positive rates and ratios; the decode
    rows once, at every JPEG scale."""
    decode = [r for r in rows if r["row"] == DECODE_ROW]
    rows = [r for r in rows if r["row"] != DECODE_ROW]
    if DECODE_ROW in names:
        assert [r["decoding"] for r in decode] == ["full", "1/2", "1/4", "1/8"]
        assert all(r["size"] is None and r["images_per_s"] > 0 for r in decode)
        assert decode[0]["vs_full"] == 1.0
        for r in decode:
            assert r["vs_full"] == pytest.approx(r["images_per_s"] / decode[0]["images_per_s"])
    else:
        assert not decode
    names = tuple(n for n in names if n != DECODE_ROW)
    assert {(r["row"], r["size"]) for r in rows} == {(n, s) for n in names for s in sizes}
    for r in rows:
        assert math.isfinite(r["images_per_s"]) and r["images_per_s"] > 0, r
        assert math.isfinite(r["step_ms"]) and r["step_ms"] > 0, r
        if r["row"] in STEP_ROWS:
            assert math.isfinite(r["ratio"]) and r["ratio"] > 0, r
            expected = 2 * r["batch"] if r["row"].startswith("simclr") else r["batch"]
            assert r["images_per_step"] == expected, r
        if r["row"].endswith("_e2e"):
            assert 0.0 <= r["data_wait"] <= 1.0, r
        if r["row"] in ("mt", "mt_e2e") and "unet" in names:
            assert math.isfinite(r["vs_unet"]) and r["vs_unet"] > 0, r
        if r["row"] in DATA_ROWS:
            assert r["images_per_s_per_worker"] > 0, r
            assert r["decoding"] in ("reduced", "full"), r
            step = "simclr" if r["row"] == "data_ssl" else "mt"
            fed = step if step in names else "ceiling"
            assert r["workers_needed"] >= 1 and r["fed_row"] == fed, r
    ceilings = [r for r in rows if r["row"] == "ceiling"]
    assert all(r["ratio"] == pytest.approx(1.0) for r in ceilings)


def test_run_bench_measures_every_row_per_size(synthetic_root: Path) -> None:
    result = run_bench(tiny(data=synthetic_root))

    check_rows(result["rows"], ROW_NAMES, SIZES)
    data_rows = [r for r in result["rows"] if r["row"] in DATA_ROWS]
    assert len(data_rows) == 2 * len(DATA_ROWS) * len(SIZES)  # reduced and full decoding
    for r in data_rows:  # the reduced rows' rate over the full rows' at the same size
        assert (r["vs_full"] is not None) == (r["decoding"] == "reduced"), r
    meta = result["meta"]
    assert meta["device"] == "cpu" and meta["precision"] == "32-true"
    assert meta["backbone"] == "test_efficientnet" and meta["compile"] is False
    table = format_table(result)
    for name in ROW_NAMES:
        assert name in table
    assert "2 x batch" in table and "torch" in table and "timm" in table
    markdown = format_table(result, markdown=True)
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + len(result["rows"])  # header + one line per row
    assert "x unet" in lines[0] and "x full" in lines[0] and "decoding" in lines[0]
    assert any(line.startswith("| unet |") for line in lines)
    assert {"full", "reduced"} <= {c.strip() for line in lines for c in line.split("|")}


def test_cli_writes_table_and_json(synthetic_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    command = [
        sys.executable,
        "-m",
        "ssl_mt.bench",
        "--device",
        "cpu",
        "--backbone",
        "test_efficientnet",
        "--sizes",
        *map(str, SIZES),
        "--batch-sizes",
        "4",
        "4",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--workers",
        "0",
        "1",
        "--data",
        str(synthetic_root),
        "--only",
        "ceiling,simclr,mt_e2e,data",
        "--out",
        str(out),
        "--threads",
        "1",
        "--decoding",
        "reduced",
        "--quiet",
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]

    result = json.loads(out.read_text())
    names = ("ceiling", "simclr", "mt_e2e", *DATA_ROWS, DECODE_ROW)
    data_rows = [r for r in result["rows"] if r["row"] in DATA_ROWS]
    assert sorted({r["workers"] for r in data_rows}) == [0, 1]  # data rows at each count
    assert len(data_rows) == 2 * len(DATA_ROWS) * len(SIZES)
    assert {r["decoding"] for r in data_rows} == {"reduced"}
    mt_e2e = [r for r in result["rows"] if r["row"] == "mt_e2e"]
    assert all(r["workers"] == 1 for r in mt_e2e)  # e2e rows: the largest count
    check_rows(result["rows"], names, SIZES)
    for name in names:
        assert name in done.stdout
    assert "img/s" in done.stdout and "x ceiling" in done.stdout
    table_rows = [line for line in done.stdout.splitlines() if line.split()[:1] == ["mt_e2e"]]
    assert len(table_rows) == len(SIZES)


def test_generates_a_synthetic_dataset_when_none_is_given() -> None:
    result = run_bench(tiny(sizes=[32], steps=1, warmup=0, only=["data_ssl"], decoding=["full"]))

    assert result["meta"]["data"].startswith("synthetic")
    assert [r["row"] for r in result["rows"]] == ["data_ssl"]
    row = result["rows"][0]
    assert row["images_per_step"] == 2 * 4  # two views per image
    assert row["workers_needed"] is None  # no step was measured to feed


def test_camera_size_photos_full_and_reduced_rows() -> None:
    """--camera: photos larger than the crop needs, so reduced decoding shows in the rows."""
    settings = tiny(
        sizes=[32],
        batch_sizes=[2],
        steps=1,
        warmup=0,
        only=["data"],
        camera=5,
        camera_size=(320, 240),
        rounds=2,
    )
    result = run_bench(settings)

    assert result["meta"]["data"].startswith(
        "camera-size synthetic: 5 JPEGs of 320x240 px (noise 4"
    )
    rows = {(r["row"], r["decoding"]): r for r in result["rows"]}
    decode = {d: rows.pop((DECODE_ROW, d)) for d in ("full", "1/2", "1/4", "1/8")}
    assert set(rows) == {(n, d) for n in DATA_ROWS for d in ("reduced", "full")}
    assert decode["1/8"]["vs_full"] > 1  # a 1/8 decode of a 320x240 JPEG does less work
    assert all(r["steps"] == 2 for r in rows.values())  # one timed batch in each of 2 rounds
    assert "(data rows: 2 rounds)" in format_table(result)
    for name in DATA_ROWS:
        reduced, full = rows[(name, "reduced")], rows[(name, "full")]
        assert reduced["vs_full"] == pytest.approx(reduced["images_per_s"] / full["images_per_s"])


def test_only_and_bad_arguments() -> None:
    assert parse_only(None) == list(ROW_NAMES)
    assert parse_only(["ceiling, data", "mt"]) == ["ceiling", "mt", *DATA_ROWS, DECODE_ROW]
    with pytest.raises(ValueError, match="unknown row"):
        parse_only(["ceilling"])
    with pytest.raises(ValueError, match="one value per size"):
        tiny(batch_sizes=[4, 4, 4]).resolved()
    with pytest.raises(ValueError, match="multiples of 32"):
        tiny(sizes=[48], only=["mt"]).resolved()
    assert main(["--device", "cpu", "--only", "nope", "--quiet"]) == 2
    with pytest.raises(ValueError, match="--rounds"):
        tiny(rounds=0).resolved()
    with pytest.raises(ValueError, match="--decoding"):
        tiny(decoding=["half"]).resolved()
    with pytest.raises(ValueError, match="--camera"):
        tiny(camera=-1).resolved()
