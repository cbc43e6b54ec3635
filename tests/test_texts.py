"""texts.py: sizes and times as docker prints them, tables sized to their content, and the
`images` / `inspect` text output."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
from conftest import FIXTURES
from test_store import ok, unpack

from ocilayers.spec import HistoryEntry
from ocilayers.texts import (
    human_duration,
    human_size,
    layer_history,
    parse_time,
    since,
    table,
)

Capsys = pytest.CaptureFixture[str]


@pytest.mark.parametrize(("size", "want"), [
    (0, "0B"), (999, "999B"), (1000, "1kB"), (1982817, "1.98MB"), (280_000_000, "280MB"),
    (5_600, "5.6kB"), (12_345_678_901, "12.3GB")])
def test_human_size_is_decimal_with_three_digits(size: int, want: str) -> None:
    assert human_size(size) == want


@pytest.mark.parametrize(("seconds", "want"), [
    (0.5, "Less than a second"), (1, "1 second"), (59, "59 seconds"), (60, "About a minute"),
    (150, "2 minutes"), (3600, "About an hour"), (5 * 3600, "5 hours"),
    (47 * 3600, "47 hours"), (2 * 86400, "2 days"), (13 * 86400, "13 days"),
    (14 * 86400, "2 weeks"), (59 * 86400, "8 weeks"), (61 * 86400, "2 months"),
    (800 * 86400, "2 years")])
def test_human_duration_as_docker(seconds: float, want: str) -> None:
    assert human_duration(seconds) == want


def test_since_parses_config_times() -> None:
    now = datetime.datetime(2026, 12, 3, tzinfo=datetime.UTC)
    assert since("2026-12-01T00:00:00.123456789Z", now) == "2 days ago"
    assert since("2026-12-02T23:00:00+00:00", now) == "About an hour ago"
    assert since(None, now) == since("garbage", now) == "N/A"
    assert parse_time("2026-11-29T04:35:33.609533313Z") is not None


def test_table_columns_fit_the_longest_cell() -> None:
    out = table(["A", "B", "C"], [["x" * 30, "y", "z"], ["s", "long-" * 5, "t"]]).splitlines()
    assert [line.index("y") for line in out[1:2]] == [out[0].index("B")]
    assert out[2].index("long") == out[0].index("B") and out[2].endswith("t")
    assert out[0].index("C") == out[2].index("t")


def test_layer_history_skips_empty_layer_entries() -> None:
    h = [HistoryEntry(created_by="a"), HistoryEntry(created_by="env", empty_layer=True),
         HistoryEntry(created_by="b")]
    assert [x.created_by if x else None for x in layer_history(h, 2)] == ["a", "b"]
    assert layer_history(h, 3) == [None, None, None]  # does not match: nothing is guessed


def test_images_table(tmp_path: Path, capsys: Capsys) -> None:
    root = tmp_path / "store"
    long_tag = "a-very-long-repository-name/with/parts:and-a-long-tag"
    ida = unpack(capsys, root, FIXTURES / "demo", "--tag", long_tag)["image_id"]
    idb = unpack(capsys, root, FIXTURES / "docker-save.tar")["image_id"]
    lines = ok(capsys, root, "images").splitlines()
    assert lines[0].split("   ")[0].strip() == "REPOSITORY:TAG"
    starts = {line[lines[0].index("IMAGE ID"):].split()[0] for line in lines[1:]}
    assert starts == {ida[7:19], idb[7:19]}  # aligned under the header, long tag or not
    for line in lines[1:]:
        assert line.endswith("MB") and " ago " in line, line
    rows = json.loads(ok(capsys, root, "images", "--json"))
    assert all(isinstance(r["size"], int) and r["created"].endswith("Z") for r in rows)
    assert idb in ok(capsys, root, "images", "--no-trunc")


def test_inspect_text_shows_layers_with_created_by(tmp_path: Path, capsys: Capsys) -> None:
    root = tmp_path / "store"
    unpack(capsys, root, FIXTURES / "docker-save.tar")
    for arg in ("committed:latest", str(FIXTURES / "docker-save.tar")):
        out = ok(capsys, root, "inspect", arg)
        header = next(line for line in out.splitlines() if line.startswith("#"))
        for col in ("CREATED BY", "SIZE", "COMPRESSED", "DIFF ID", "CHAIN ID"):
            assert col in header, (arg, header)
        assert "layer 1: busybox rootfs" in out and "Created:" in out
        assert "1.98MB" in out or "2.01MB" in out
