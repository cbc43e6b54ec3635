"""benchmarks/run.py --quick: it runs end to end (unpack, pack, tarsplit, commit, growth and
registry groups), prints the tables and exits 0 (no timings are checked: speed belongs in the
benchmark output, not in a test). And the smallfiles group's input builder, on a tiny size."""

from __future__ import annotations

import gzip
import hashlib
import importlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from types import ModuleType
from typing import Any

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO, "benchmarks")
NEEDS = ("umoci", "gzip", "zstd", "tar")


def _benchmarks_module(name: str) -> ModuleType:
    """A module of benchmarks/ (they import each other by their plain names)."""
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    return importlib.import_module(name)


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
    started = int(time.time())  # (the harness records whole seconds)
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "run.py"), "--quick", "--no-docker",
         "--cache", cache, "--json", out,
         # a plain --quick runs the first three; commit's quick variant only when asked
         "--only", "unpack", "--only", "pack", "--only", "tarsplit", "--only", "commit"],
        cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("tool") and "wall s" in line for line in lines) == 4, proc.stdout
    for row in ("ocilayers unpack, cold (gzip)", "ocilayers unpack, dedup re-unpack (gzip)",
                "ocilayers unpack, cold (zstd)", "umoci raw unpack", "gzip -dc | tar -x",
                "zstd -dc | tar -x",
                "ocilayers pack --compression gzip", "tar|gzip -6",
                "ocilayers pack --compression zstd", "tar|zstd -3", "umoci repack",
                "ocilayers unpack --jobs 1 (in-process wrapper)",
                "the same, tar-split writer and size walk no-ops",
                "floor 1/2: inflate + both sha256 only", "floor 2/2: tar -x of the decompressed",
                "ocilayers commit --upper DIR --from IMAGE"):
        assert any(line.startswith(row) for line in lines), row
    assert "ratios of medians" in proc.stdout
    if _benchmarks_module("measure").ext4_without_journal(cache):
        # (this VM's disk): nothing deleted until the end
        assert "nothing is deleted between timed runs" in proc.stdout
        assert "its outputs deleted" not in proc.stderr
    else:
        assert "unpack round 2/2: its outputs deleted (not timed)" in proc.stderr
    for ratio in ("ocilayers pack (gzip) / tar|gzip -6 = ",
                  "ocilayers pack (zstd) / tar|zstd -3 = ",
                  "ocilayers pack (gzip) / umoci repack = "):
        assert ratio in proc.stdout, ratio
    assert "tar-split + size share of `ocilayers unpack --jobs 1` (gzip), cProfile: " \
        in proc.stdout
    assert "tar-split + size share without a profiler" in proc.stdout
    assert "unpack floor (gzip): inflate + hashes " in proc.stdout
    with open(out) as f:
        result = json.load(f)
    groups = result["groups"]
    assert sorted(groups) == ["commit", "pack", "tarsplit", "unpack"]
    for name in ("unpack", "pack", "tarsplit", "commit"):
        assert all("median_wall_s" in r for r in groups[name]["results"]), groups[name]
        # a memory probe before every timed run (a noise indicator, not a timing)
        assert all(len(r["memory_probe_us"]) == r["runs"] and min(r["memory_probe_us"]) > 0
                   for r in groups[name]["results"]), groups[name]
    assert "(memory probe " in proc.stderr
    assert all("output_bytes" in r for r in groups["pack"]["results"])
    floor = groups["unpack"]["floor"]
    assert floor["floor_cpu_s"] == pytest.approx(
        floor["inflate_and_hash_cpu_s"] + floor["tar_x_cpu_s"], abs=0.002)
    assert floor["floor_wall_s"] > 0
    assert 0 < groups["tarsplit"]["profile"]["share_of_total"] < 1
    assert "share" in groups["tarsplit"]["ablation"]
    # every commit made one new layer of the upper dir's content (+ the round's marker file)
    made = groups["commit"]["layers"]["ocilayers-commit-upper"]
    assert len(made) == 2 and all(x["size"] > 0 for x in made), made
    assert len({x["diff_id"] for x in made}) == 2, made
    assert "docker commit skipped: --no-docker" in groups["commit"]["notes"]
    # nothing left behind but the cached inputs, the profile and the results
    assert sorted(os.listdir(cache)) == [".cleaned", ".lock", "pack-quick-v1", "quick-v1",
                                         "unpack-jobs1.prof"]
    with open(os.path.join(cache, ".cleaned")) as f:  # when the outputs were deleted: in this run
        assert started <= float(f.read()) <= time.time() + 1


@pytest.mark.slow
def test_quick_growth_group(tmp_path: object) -> None:
    """`--quick --only growth`: history (store, gzip layout, gzip | tar -t) and squash vs pack
    on the quick image; its cached store and flattened dir are made once (~15 s in all)."""
    if shutil.which("umoci") is None or not os.access("/usr/bin/time", os.X_OK):
        pytest.skip("missing tools: umoci (quick image build) or /usr/bin/time")
    if not _can_chown():
        pytest.skip("the harness needs root (owners, umoci)")
    cache = os.path.join(str(tmp_path), "cache")
    out = os.path.join(str(tmp_path), "quick.json")
    # The cache on a tmpfs: not an ext4 without a journal (as this VM's disk is), so the
    # harness deletes each round's outputs after the round instead of keeping all to the end.
    os.makedirs(cache)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4g", "tmpfs", cache],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs for the cache dir")
    try:
        proc = subprocess.run(
            [sys.executable, os.path.join(REPO, "benchmarks", "run.py"), "--quick",
             "--no-docker", "--cache", cache, "--json", out, "--only", "growth"],
            cwd=REPO, capture_output=True, text=True, timeout=300)
        left = sorted(os.listdir(cache))
    finally:
        subprocess.run(["umount", cache], check=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "each round's outputs are deleted after the round" in proc.stdout
    for rnd in (1, 2):
        assert f"growth round {rnd}/2: its outputs deleted (not timed)" in proc.stderr
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("tool") and "wall s" in line for line in lines) == 1, proc.stdout
    for row in ("ocilayers history IMAGE --json (store, scan cache)",
                "ocilayers history IMAGE --json (store, first read: tar-split records)",
                "ocilayers history LAYOUT --json (gzip OCI layout)",
                "gzip -dc | tar -t > /dev/null, every layer in turn",
                "ocilayers squash IMAGE --all -o OUT --format oci (store)",
                "ocilayers pack FLATDIR -o OUT --compression gzip"):
        assert any(line.startswith(row) for line in lines), row
    assert any(line.strip().startswith("history IMAGE (store, first read) / history LAYOUT "
                                       "(gzip) = ") for line in lines), proc.stdout
    for ratio in ("history IMAGE (store) / history LAYOUT (gzip) = ",
                  "history LAYOUT (gzip) / gzip -dc | tar -t = ",
                  "squash --all (store) / pack of the flattened image = "):
        assert any(line.strip().startswith(ratio) and "goal <= " in line
                   for line in lines), ratio
    assert "history from the store and from the gzip layout agree" in proc.stdout
    with open(out) as f:
        group = json.load(f)["groups"]["growth"]
    assert group["runs_per_tool"] == 2
    assert all(r.get("runs") == 2 for r in group["results"]), group["results"]
    assert [x.get("goal_at_most") for x in group["ratios"]] == [0.25, None, 1.2, 1.2, None]
    assert all(isinstance(x["goal_met"], bool) for x in group["ratios"]
               if x.get("goal_at_most") is not None)
    squash, pack = (next(r for r in group["results"] if r["key"] == k)
                    for k in ("ocilayers-squash-all", "ocilayers-pack-flat"))
    # the same merged rootfs, gzip both: layer blobs of about the same size
    assert 0.8 < squash["output_bytes"] / pack["output_bytes"] < 1.25, (squash, pack)
    assert left == [".cleaned", ".lock", "growth-quick-v1", "quick-v1"]


@pytest.mark.slow
def test_quick_registry_group(tmp_path: object) -> None:
    """`--quick --only registry --no-docker`: pull (cold, re-pull, skopeo + umoci) and push
    (layout vs skopeo, store) through docker-registries on loopback that the harness starts and
    stops; ~25 s with the quick image build."""
    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry is not installed (Debian package docker-registry)")
    missing = [t for t in ("umoci", "skopeo") if shutil.which(t) is None]
    if missing or not os.access("/usr/bin/time", os.X_OK):
        pytest.skip(f"missing tools: {', '.join(missing) or '/usr/bin/time'}")
    if not _can_chown():
        pytest.skip("the harness needs root (owners, umoci)")
    cache = os.path.join(str(tmp_path), "cache")
    out = os.path.join(str(tmp_path), "quick.json")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "run.py"), "--quick", "--no-docker",
         "--cache", cache, "--json", out, "--only", "registry"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("tool") and "wall s" in line for line in lines) == 1, proc.stdout
    for row in ("ocilayers unpack docker://, empty store",
                "ocilayers unpack docker://, image present (re-pull)",
                "skopeo copy docker:// oci: + umoci raw unpack",
                "ocilayers push LAYOUT docker:// (gzip layout)",
                "skopeo copy oci:LAYOUT docker://",
                "ocilayers push IMAGE docker:// (store, gzip)"):
        assert any(line.startswith(row) for line in lines), row
    for ratio in ("ocilayers unpack docker:// / skopeo copy + umoci raw unpack = ",
                  "ocilayers push LAYOUT / skopeo copy oci: docker:// = "):
        assert any(line.strip().startswith(ratio) and "goal <= " in line
                   for line in lines), ratio
    assert any(line.startswith("ocilayers unpack docker://, image present (re-pull): median ")
               and "goal < 0.3 s: " in line for line in lines), proc.stdout
    assert "PROBLEM" not in proc.stdout
    with open(out) as f:
        group = json.load(f)["groups"]["registry"]
    assert group["runs_per_tool"] == 2
    assert all(r.get("runs") == 2 for r in group["results"]), group["results"]
    assert [x.get("goal_at_most") for x in group["ratios"]] == [0.5, 1.0]
    assert "docker pull and docker push skipped: --no-docker" in group["notes"]
    assert [g["key"] for g in group["absolute_goals"]] == ["ocilayers-repull"]
    # every push went to an empty registry and uploaded every blob (quick image: 5 layers +
    # config), none found there or mounted
    assert sorted(group["pushes"]) == ["ocilayers-push-layout", "ocilayers-push-store",
                                       "skopeo-push-layout"]
    for key, runs in group["pushes"].items():
        assert [(x["uploads"], x["mounts"], x["heads_present"]) for x in runs] \
            == [(6, 0, 0)] * 2, (key, runs)
    by = {r["key"]: r for r in group["results"]}
    # the layout rows push the same blobs
    assert by["ocilayers-push-layout"]["output_bytes"] == by["skopeo-push-layout"]["output_bytes"]
    # every registry was stopped (by pid): no docker-registry serving the run's configs
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            assert os.fsencode(cache) not in cmdline, cmdline
    assert sorted(os.listdir(cache)) == [".cleaned", ".lock", "quick-v1"]


@pytest.mark.slow
def test_quick_refuses_memory_group(tmp_path: object) -> None:
    """The memory group builds ~2 GiB layers: full runs only."""
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "run.py"), "--quick", "--only",
         "memory", "--cache", os.path.join(str(tmp_path), "cache")],
        cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "full runs only" in proc.stderr


def _tree(top: str) -> dict[str, str]:
    """Every file under `top` (relative path -> sha256 of its bytes)."""
    out = {}
    for dirpath, _dirs, files in os.walk(top):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, top)] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_smallfiles_input_tiny(tmp_path: Any) -> None:
    """The smallfiles group's input builder on 3 dirs x 4 files (well under a second): built
    twice, byte for byte the same; cached; two valid single-layer OCI layouts of one tar."""
    if shutil.which("gzip") is None or shutil.which("zstd") is None:
        pytest.skip("gzip and zstd (the command-line tools) are needed")
    zstandard = pytest.importorskip("zstandard")
    sf = _benchmarks_module("smallfiles")
    a, built_a = sf.ensure_input(str(tmp_path / "a"), 3, 4)
    b, built_b = sf.ensure_input(str(tmp_path / "b"), 3, 4)
    again, built_again = sf.ensure_input(str(tmp_path / "a"), 3, 4)
    assert (built_a, built_b, built_again) == (True, True, False)
    assert again.dir == a.dir and again.meta == a.meta
    # published whole, no scratch dir left; the plain tar is not kept
    assert os.listdir(tmp_path / "a") == ["smallfiles-v1-3x4"]
    assert sorted(os.listdir(a.dir)) == ["meta.json", "oci-gzip", "oci-zstd"]

    def strip(meta: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in meta.items() if k != "build_seconds"}

    assert strip(a.meta) == strip(b.meta)
    # every file of both layouts, byte for byte (meta.json differs only in build_seconds)
    assert {k: v for k, v in _tree(a.dir).items() if k != "meta.json"} \
        == {k: v for k, v in _tree(b.dir).items() if k != "meta.json"}
    m = a.meta
    assert (m["files"], m["dirs"], m["entries"], m["file_bytes"]) == (12, 3, 16, 12 * 600)

    def read_blob(layout: str, digest: str) -> bytes:
        algo, hexpart = digest.split(":", 1)
        with open(os.path.join(layout, "blobs", algo, hexpart), "rb") as f:
            data = f.read()
        assert hashlib.sha256(data).hexdigest() == hexpart
        return data

    tars = []
    configs = []
    for comp, media in (("gzip", "application/vnd.oci.image.layer.v1.tar+gzip"),
                        ("zstd", "application/vnd.oci.image.layer.v1.tar+zstd")):
        layout = a.layout(comp)
        with open(os.path.join(layout, "oci-layout")) as f:
            assert json.load(f) == {"imageLayoutVersion": "1.0.0"}
        with open(os.path.join(layout, "index.json")) as f:
            index = json.load(f)
        assert len(index["manifests"]) == 1
        desc = index["manifests"][0]
        assert desc["annotations"] == {"org.opencontainers.image.ref.name": "latest"}
        raw = read_blob(layout, desc["digest"])
        assert len(raw) == desc["size"]
        manifest = json.loads(raw)
        assert manifest["mediaType"] == desc["mediaType"] \
            == "application/vnd.oci.image.manifest.v1+json"
        assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
        config = json.loads(read_blob(layout, manifest["config"]["digest"]))
        configs.append(config)
        assert (config["architecture"], config["os"]) == ("amd64", "linux")
        [layer] = manifest["layers"]
        assert layer["mediaType"] == media
        blob = read_blob(layout, layer["digest"])
        assert len(blob) == layer["size"] == m["blobs"][comp]["size"]
        assert a.blob(comp).endswith(layer["digest"].split(":", 1)[1])
        if comp == "gzip":
            tars.append(gzip.decompress(blob))
        else:
            tars.append(zstandard.ZstdDecompressor().decompressobj().decompress(blob))
        assert config["rootfs"] == {"type": "layers", "diff_ids": [
            "sha256:" + hashlib.sha256(tars[-1]).hexdigest()]}
    assert tars[0] == tars[1] and configs[0] == configs[1]
    tar = tars[0]
    assert len(tar) == m["tar_bytes"] and "sha256:" + hashlib.sha256(tar).hexdigest() \
        == m["diff_id"]
    assert len(tar) % 512 == 0 and tar.endswith(b"\0" * 1024)
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        members = tf.getmembers()
        names = [x.name for x in members]
        want = ["pkg"]
        for d in range(3):
            want += [f"pkg/d{d:04d}"] + [f"pkg/d{d:04d}/f{i:03d}.js" for i in range(4)]
        assert names == want
        rng = random.Random(1)
        for x in members:
            assert (x.mtime, x.uid, x.gid, x.uname, x.gname) == (1700000000, 0, 0, "", "")
            assert x.mode == (0o755 if x.isdir() else 0o644)
            if x.isfile():
                data = tf.extractfile(x)
                assert data is not None
                assert data.read() == rng.randbytes(300).hex().encode()


def test_ext4_without_journal_matches_jbd2(tmp_path: Any) -> None:
    """The harness's settle rule: an ext4 without a journal is told apart by its mount options
    (no data= mode); checked against the kernel's own sign of a journal, a jbd2 entry."""
    measure = _benchmarks_module("measure")
    assert measure.ext4_without_journal("/proc") is False  # not a block device's fs
    if os.path.isdir("/dev/shm"):
        assert measure.ext4_without_journal("/dev/shm") is False  # tmpfs
    st = os.stat(tmp_path)
    dev = os.path.basename(os.path.realpath(f"/sys/dev/block/{os.major(st.st_dev)}:"
                                            f"{os.minor(st.st_dev)}"))
    if not os.path.isdir(f"/proc/fs/ext4/{dev}"):
        pytest.skip(f"{tmp_path} is not on an ext4 with a /proc/fs/ext4 entry")
    journaled = os.path.isdir("/proc/fs/jbd2") and any(
        name.startswith(f"{dev}-") for name in os.listdir("/proc/fs/jbd2"))
    assert measure.ext4_without_journal(str(tmp_path)) is (not journaled)


def test_memory_probe_times_new_pages() -> None:
    measure = _benchmarks_module("measure")
    us = measure.memory_probe(4)
    assert isinstance(us, float) and us > 0  # microseconds per page (no bound: not a goal)


def test_stale_build_dirs_are_unmounted_then_removed(tmp_path: Any) -> None:
    """A build killed mid-way leaves its scratch dir, and an overlay mounted in it: the next
    run (holding the cache's lock) unmounts what is inside, then deletes it; the cached inputs
    and a kept run's outputs stay."""
    inputs = _benchmarks_module("inputs")
    cache = tmp_path / "cache"
    merged = cache / ".build-full-x1" / "merged"
    merged.mkdir(parents=True)
    (cache / ".build-quick-x2").mkdir()
    (cache / "full-v1").mkdir()
    (cache / "runs" / "kept").mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(merged)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs (needs root)")
    try:
        (merged / "in-the-mount").write_text("x")
        removed = inputs.remove_stale_builds(str(cache))
        assert removed == [str(cache / ".build-full-x1"), str(cache / ".build-quick-x2")]
        assert not os.path.ismount(merged)
        assert sorted(os.listdir(cache)) == ["full-v1", "runs"]
        assert os.listdir(cache / "runs") == ["kept"]
    finally:
        while os.path.ismount(merged):
            subprocess.run(["umount", str(merged)], check=False)


def test_sigterm_ends_the_harness_through_its_finally_blocks(tmp_path: Any) -> None:
    """`kill` of a run ends it as Ctrl-C does, so a build's mounts are unmounted: with
    exit_on_sigterm, SIGTERM raises SystemExit(143) where the run is, and finally runs."""
    marker = tmp_path / "finally-ran"
    code = (f"import os, signal, sys, time; sys.path.insert(0, {BENCHMARKS!r})\n"
            "import run\n"
            "run.exit_on_sigterm()\n"
            "try:\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(30)\n"
            "finally:\n"
            f"    open({str(marker)!r}, 'w').close()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=str(tmp_path))
    assert proc.returncode == 143, proc.stderr
    assert marker.exists()
