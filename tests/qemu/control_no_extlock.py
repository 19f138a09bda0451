#!/usr/bin/python3
"""Control experiment: the concurrency workloads WITHOUT extlock.

SPDX-License-Identifier: GPL-2.0-or-later
Copyright (c) 2026 The extlock authors

test_concurrency.py asserts that with extlock nodes no extent is ever torn.
That is only meaningful if the same workloads do tear without extlock.
This script (not a test: the outcome of a race is not deterministic) runs
them on the bare images - NFS export and local file - and prints how often
the final state had a torn extent and how many unlocked concurrent reads
saw a write in progress:

    /usr/bin/python3 tests/qemu/control_no_extlock.py [RUNS]

Needs the QEMU build (qemu-io) and starts its own loopback NFS server.
"""

import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import procs as hp                          # noqa: E402
from harness.ganesha import NfsServer                    # noqa: E402
from harness.patterns import check_uniform_extents, fill  # noqa: E402
import test_concurrency as tc                            # noqa: E402

IMAGE_SIZE = 64 * 1024 * 1024


class Image:
    def __init__(self, kind, path):
        self.kind, self.path = kind, path
        self.child = hp.nfs_child(path) if kind == "nfs" else hp.file_child(path)


def new_image(kind, nfs, workdir):
    # a fresh name every time: ganesha caches names, so a file deleted and
    # re-created behind its back under the same name would be stale
    path = (nfs.export_dir / f"{workdir.name}.raw") if kind == "nfs" \
        else workdir / "image.raw"
    with open(path, "wb") as f:
        f.truncate(IMAGE_SIZE)
    return Image(kind, path)


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    hp.binary("qemu-io")
    nfs = NfsServer().start()
    try:
        for kind in ("nfs", "local"):
            for name, spec in tc.LAYOUTS.items():
                torn_runs = 0
                for _ in range(runs):
                    wd = Path(tempfile.mkdtemp(prefix="xlctl-"))
                    img = new_image(kind, nfs, wd)
                    tc.wait_writers(tc.start_writers(img, wd, spec), wd)
                    _, problems = check_uniform_extents(
                        img.path, spec["extent_size"], spec["extents"],
                        set(tc.PATTERNS), offset=spec.get("offset", 0))
                    torn_runs += bool(problems)
                    img.path.unlink()
                    shutil.rmtree(wd)
                print(f"{kind:5} {name:16} final state torn in {torn_runs}/{runs} runs",
                      flush=True)
            for name in ("aligned-1M", "aligned-4M"):
                spec = dict(tc.LAYOUTS[name], rounds=tc.LAYOUTS[name]["rounds"] * 3)
                size, extents = spec["extent_size"], spec["extents"]
                wd = Path(tempfile.mkdtemp(prefix="xlctl-"))
                img = new_image(kind, nfs, wd)
                fill(img.path, 0, size * extents, 0x01)
                writers = tc.start_writers(img, wd, spec)
                try:
                    stats = tc.read_while_writing(writers, img.path, extents, size,
                                                  {0x01, *tc.PATTERNS})
                finally:
                    tc.wait_writers(writers, wd)
                print(f"{kind:5} {name:16} unlocked reads that saw a write in "
                      f"progress: {len(stats['torn'])}/{stats['reads']}", flush=True)
                img.path.unlink()
                shutil.rmtree(wd)
    finally:
        nfs.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
