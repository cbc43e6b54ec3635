"""Messages that say what is wrong: a cut archive is truncated (not "no image"), and a store
root below a regular file names that file."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import FIXTURES, assert_one_line_error, run_cli

Capsys = pytest.CaptureFixture[str]


@pytest.mark.parametrize("fixture", ["tiny-oci.tar", "tiny-docker.tar", "docker-save.tar"])
def test_every_cut_of_an_archive_says_truncated(tmp_path: Path, capsys: Capsys,
                                                fixture: str) -> None:
    data = (FIXTURES / fixture).read_bytes()
    end = len(data.rstrip(b"\0"))  # past the last member: cuts there lose only zero padding
    for cut in sorted({512, 1024, 1536, 2048, end // 3, end // 2, end - 700, end - 1}):
        path = tmp_path / f"cut-{cut}.tar"
        path.write_bytes(data[:cut])
        code, _out, err = run_cli(["inspect", str(path)], capsys)
        assert_one_line_error(code, err, path.name, "truncated")


@pytest.mark.parametrize("below", ["file/store", "file/a/b/store"])
def test_root_below_a_regular_file(tmp_path: Path, capsys: Capsys, below: str) -> None:
    (tmp_path / "file").write_text("")
    code, _out, err = run_cli(["--root", str(tmp_path / below), "unpack",
                               str(FIXTURES / "tiny")], capsys)
    assert_one_line_error(code, err, f"{tmp_path / 'file'} is not a directory")
