"""benchmarks/run.py --quick: it runs end to end, prints the table and exits 0 (no timings
are checked: speed belongs in the benchmark output, not in a test)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEEDS = ("umoci", "gzip", "zstd", "tar")


def _can_chown() -> bool:
    with tempfile.NamedTemporaryFile() as f:
        try:
            os.chown(f.name, 1, 1)
        except PermissionError:
            return False
    return True


@pytest.mark.slow
def test_quick_benchmark_prints_table(tmp_path: object) -> None:
    missing = [t for t in NEEDS if shutil.which(t) is None]
    if missing or not os.access("/usr/bin/time", os.X_OK):
        pytest.skip(f"missing tools: {', '.join(missing) or '/usr/bin/time'}")
    if not _can_chown():
        pytest.skip("the harness needs root (owners, umoci, mounts)")
    cache = os.path.join(str(tmp_path), "cache")
    out = os.path.join(str(tmp_path), "quick.json")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "run.py"), "--quick", "--no-docker",
         "--cache", cache, "--json", out],
        cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("tool") and "wall s" in line for line in lines), proc.stdout
    for row in ("ocilayers unpack, cold (gzip)", "ocilayers unpack, dedup re-unpack (gzip)",
                "ocilayers unpack, cold (zstd)", "umoci raw unpack", "gzip -dc | tar -x",
                "zstd -dc | tar -x"):
        assert any(line.startswith(row) for line in lines), row
    assert "ratios of medians" in proc.stdout
    with open(out) as f:
        result = json.load(f)
    assert all("median_wall_s" in r for r in result["results"]), result["results"]
    # nothing left behind but the cached input and the results
    assert sorted(os.listdir(cache)) == [".lock", "quick-v1"]
